//! Parsing of `#[domain_event(...)]`, and of the keys of `#[serde(...)]` that decide
//! whether an enum can be stored the way eventfold stores it.

use std::cell::RefCell;
use std::fmt::Display;

use proc_macro2::{Span, TokenTree};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, Lit, LitStr, Path, Token, UnOp};

/// Collects every error of one derive, so that a build reports all of them at once.
pub(crate) struct Ctxt {
    errors: RefCell<Vec<syn::Error>>,
}

impl Ctxt {
    pub(crate) fn new() -> Self {
        Ctxt {
            errors: RefCell::new(Vec::new()),
        }
    }

    /// Records an error pointing at `tokens`.
    pub(crate) fn error_spanned_by(&self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records an error pointing at `span`.
    pub(crate) fn error_at(&self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    /// Records an error of syn's.
    pub(crate) fn push(&self, error: syn::Error) {
        self.errors.borrow_mut().push(error);
    }

    /// All errors recorded, combined into one, or `Ok` if there were none.
    pub(crate) fn check(self) -> syn::Result<()> {
        let mut errors = self.errors.into_inner().into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for error in errors {
            combined.combine(error);
        }
        Err(combined)
    }
}

/// Where a `#[domain_event]` attribute sits, which decides the keys it takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    Struct,
    Enum,
    Variant,
    Field,
}

impl Position {
    fn keys(self) -> &'static [&'static str] {
        match self {
            Position::Struct => &["aggregate", "name", "version", "crate"],
            Position::Enum => &["aggregate", "version", "crate", "group"],
            Position::Variant => &["name", "version"],
            Position::Field => &["aggregate_id"],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Position::Struct => "a struct",
            Position::Enum => "an enum",
            Position::Variant => "an enum variant",
            Position::Field => "a field",
        }
    }

    /// Why a key that is valid elsewhere is refused here.
    fn misplaced(self, key: &str) -> Option<&'static str> {
        match (self, key) {
            (Position::Enum, "name") => Some(
                "`name` goes on each variant of an enum, not on the enum: \
                 `#[domain_event(name = \"...\")]` above the variant",
            ),
            (Position::Variant, "aggregate" | "crate") => Some(
                "`aggregate` and `crate` go on the enum, not on a variant: \
                 all variants of an enum belong to one aggregate type",
            ),
            (Position::Struct | Position::Enum | Position::Variant, "aggregate_id") => Some(
                "`aggregate_id` goes on a field: it marks the field that holds the aggregate id",
            ),
            (Position::Struct | Position::Variant | Position::Field, "group") => Some(
                "`group` goes on an enum whose variants each hold one event struct: \
                 #[domain_event(group)] above `enum ... { Opened(Opened), .. }`",
            ),
            (Position::Field, "aggregate" | "name" | "version" | "crate") => Some(
                "a field takes only the flag `aggregate_id`; the other keys go on the type or variant",
            ),
            _ => None,
        }
    }
}

/// The values of every `#[domain_event(...)]` attribute on one item.
#[derive(Default)]
pub(crate) struct Attrs {
    /// `aggregate = "..."`
    pub(crate) aggregate: Option<LitStr>,
    /// `name = "..."`
    pub(crate) name: Option<LitStr>,
    /// `version = N`, if valid.
    pub(crate) version: Option<u32>,
    /// `crate = "path"`, if valid.
    pub(crate) krate: Option<Path>,
    /// The `aggregate_id` flag, by the span of the word.
    pub(crate) aggregate_id: Option<Span>,
    /// Every key given in its place, with a valid value or not.
    given: Vec<&'static str>,
}

impl Attrs {
    /// Whether `key` was given, even with a value that was refused: its error is reported,
    /// and it is not missing.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.given.contains(&key)
    }
}

/// Parses every `#[domain_event(...)]` in `attrs`, recording errors in `cx` and going on
/// after each, so that one build shows every mistake.
pub(crate) fn parse(cx: &Ctxt, attrs: &[Attribute], position: Position) -> Attrs {
    let mut out = Attrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("domain_event")) {
        let result = attr.parse_nested_meta(|meta| {
            let key = meta.path.to_token_stream().to_string().replace(' ', "");
            let Some(&key) = position.keys().iter().find(|k| **k == key) else {
                let message = match position.misplaced(&key) {
                    Some(why) => why.to_owned(),
                    None => format!(
                        "unknown key `{key}` in #[domain_event] on {}; expected {}",
                        position.describe(),
                        list(position.keys()),
                    ),
                };
                cx.error_spanned_by(&meta.path, message);
                return skip_value(&meta);
            };
            if out.has(key) {
                cx.error_spanned_by(
                    &meta.path,
                    format!("repeated key `{key}`: give it once per #[domain_event]"),
                );
                return skip_value(&meta);
            }
            out.given.push(key);

            if key == "aggregate_id" || key == "group" {
                if !at_end(&meta) {
                    cx.error_spanned_by(
                        &meta.path,
                        format!("`{key}` is a flag and takes no value: #[domain_event({key})]"),
                    );
                    return skip_value(&meta);
                }
                // `group` is known by `has("group")`; `aggregate_id` keeps its span.
                if key == "aggregate_id" {
                    out.aggregate_id = Some(meta.path.span());
                }
                return Ok(());
            }

            let Some(value) = value(cx, &meta, key)? else {
                return Ok(());
            };
            match key {
                "aggregate" => out.aggregate = string(cx, key, &value, "\"Account\""),
                "name" => out.name = string(cx, key, &value, "\"FundsDeposited\""),
                "version" => out.version = version(cx, &value),
                "crate" => {
                    let lit = string(cx, key, &value, "\"eventfold_core\"");
                    out.krate = lit.and_then(|lit| match lit.parse::<Path>() {
                        Ok(path) => Some(path),
                        Err(_) => {
                            let message = format!(
                                "`crate` must be a path, like `crate = \"eventfold_core\"`; \
                                 `{}` is not one",
                                lit.value()
                            );
                            cx.error_spanned_by(&lit, message);
                            None
                        }
                    });
                }
                _ => unreachable!("every key of Position::keys is handled"),
            }
            Ok(())
        });
        if let Err(error) = result {
            cx.push(error);
        }
    }
    out
}

/// The keys of every `#[serde(...)]` in `attrs`, e.g. `tag` of `#[serde(tag = "type")]`.
///
/// Malformed serde attributes are left to serde's own derive to report.
pub(crate) fn serde_keys(attrs: &[Attribute]) -> Vec<Path> {
    let mut keys = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            keys.push(meta.path.clone());
            skip_value(&meta)
        });
    }
    keys
}

/// `a`, `b` or `c`
fn list(keys: &[&str]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Whether nothing follows the key before the next comma.
fn at_end(meta: &ParseNestedMeta<'_>) -> bool {
    meta.input.is_empty() || meta.input.peek(Token![,])
}

/// Consumes whatever follows a key up to the next comma: `= value` or `(...)`.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    while !at_end(meta) {
        meta.input.parse::<TokenTree>()?;
    }
    Ok(())
}

/// The expression after `key =`, or `None` (error recorded) if the key has no value.
fn value(cx: &Ctxt, meta: &ParseNestedMeta<'_>, key: &str) -> syn::Result<Option<Expr>> {
    if meta.input.peek(Token![=]) {
        return meta.value()?.parse::<Expr>().map(Some);
    }
    cx.error_spanned_by(
        &meta.path,
        format!("`{key}` takes a value: {}", example(key)),
    );
    skip_value(meta)?;
    Ok(None)
}

fn example(key: &str) -> &'static str {
    match key {
        "aggregate" => "`aggregate = \"Account\"`",
        "name" => "`name = \"FundsDeposited\"`",
        "version" => "`version = 2`",
        _ => "`crate = \"eventfold_core\"`",
    }
}

/// An expression without the invisible groups that `macro_rules!` wraps around `$e:expr`.
fn peel(mut expr: &Expr) -> &Expr {
    while let Expr::Group(group) = expr {
        expr = &group.expr;
    }
    expr
}

fn string(cx: &Ctxt, key: &str, value: &Expr, example: &str) -> Option<LitStr> {
    if let Expr::Lit(lit) = peel(value)
        && let Lit::Str(s) = &lit.lit
    {
        return Some(s.clone());
    }
    cx.error_spanned_by(
        value,
        format!("`{key}` must be a string literal, like `{key} = {example}`"),
    );
    None
}

fn version(cx: &Ctxt, value: &Expr) -> Option<u32> {
    match peel(value) {
        Expr::Lit(lit) => {
            if let Lit::Int(int) = &lit.lit {
                return match int.base10_parse::<u32>() {
                    Ok(0) => {
                        cx.error_spanned_by(
                            int,
                            "schema versions start at 1: use `version = 1` or more",
                        );
                        None
                    }
                    Ok(version) => Some(version),
                    Err(_) => {
                        cx.error_spanned_by(
                            int,
                            format!("`version` must fit in a u32 (at most {})", u32::MAX),
                        );
                        None
                    }
                };
            }
        }
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => {
            if let Expr::Lit(lit) = peel(&unary.expr)
                && let Lit::Int(_) = lit.lit
            {
                cx.error_spanned_by(
                    value,
                    "schema versions start at 1: use `version = 1` or more",
                );
                return None;
            }
        }
        _ => {}
    }
    cx.error_spanned_by(
        value,
        "`version` must be an integer literal, like `version = 2`",
    );
    None
}

#[cfg(test)]
mod tests {
    use super::list;

    #[test]
    fn keys_are_listed_with_or_before_the_last() {
        assert_eq!(list(&["name"]), "`name`");
        assert_eq!(list(&["name", "version"]), "`name` or `version`");
        assert_eq!(list(&["a", "b", "c"]), "`a`, `b` or `c`");
    }
}
