//! The checks that a parsed [`Input`] must pass before code is generated.

use syn::Path;

use crate::ast::{Data, EventType, Field, Input};
use crate::attr::Ctxt;

/// serde attributes on the enum that change the stored form of a variant's content (a
/// conversion through another type hides the variants eventfold addresses).
const FORBIDDEN_ON_ENUM: &[&str] = &["tag", "content", "untagged", "from", "try_from", "into"];

/// serde attributes on a variant that remove it from one direction or shift the variant
/// indexes eventfold reads content back by.
const FORBIDDEN_ON_VARIANT: &[&str] = &[
    "skip",
    "skip_serializing",
    "skip_deserializing",
    "other",
    "untagged",
];

/// Records every reason `input` cannot derive `DomainEvent`.
pub(crate) fn check(cx: &Ctxt, input: &Input<'_>) {
    if let Data::Union(union) = &input.data {
        cx.error_spanned_by(
            union.union_token,
            "unions cannot be domain events; use a struct or an enum",
        );
        return;
    }
    let generics = &input.original.generics;
    if !generics.params.is_empty() {
        cx.error_spanned_by(
            generics,
            "generic event types are not supported: an event type is registered once, by name",
        );
    }
    check_aggregate(cx, input);
    if input.is_group() {
        check_group(cx, input);
        return;
    }

    match &input.data {
        Data::Struct(fields) => {
            check_name(cx, &input.struct_event_type());
            check_aggregate_id(cx, fields);
        }
        Data::Enum(data) => {
            if data.variants.is_empty() {
                cx.error_spanned_by(
                    input.ident,
                    "an enum without variants has no event types; add one variant per event type",
                );
            }
            check_serde(cx, &data.serde_keys, FORBIDDEN_ON_ENUM, "the enum");
            let mut seen: Vec<(String, &syn::Ident)> = Vec::new();
            for variant in &data.variants {
                check_serde(cx, &variant.serde_keys, FORBIDDEN_ON_VARIANT, "a variant");
                let event_type = input.variant_event_type(variant);
                if check_name(cx, &event_type) {
                    if let Some((_, first)) = seen.iter().find(|(name, _)| *name == event_type.name)
                    {
                        cx.error_at(
                            event_type.name_span,
                            format!(
                                "event type name `{}` is already used by variant `{first}`; \
                                 give each variant its own name with \
                                 #[domain_event(name = \"...\")]",
                                event_type.name
                            ),
                        );
                    } else {
                        seen.push((event_type.name, variant.ident));
                    }
                }
                check_aggregate_id(cx, &variant.fields);
            }
        }
        Data::Union(_) => unreachable!("returned above"),
    }
}

/// A group: an enum of newtype variants, each holding a distinct event type that keeps its
/// own name and version.
fn check_group(cx: &Ctxt, input: &Input<'_>) {
    let Data::Enum(data) = &input.data else {
        unreachable!("`group` is refused on a struct by attr::parse")
    };
    if data.variants.is_empty() {
        cx.error_spanned_by(
            input.ident,
            "a group without variants has no event types; add one variant per event struct, \
             like `Opened(Opened)`",
        );
    }
    if input.attrs.has("version") {
        cx.error_spanned_by(
            input.ident,
            "a group takes no `version`: each member keeps the schema version of its own type",
        );
    }
    let mut seen: Vec<(String, &syn::Ident)> = Vec::new();
    for variant in &data.variants {
        if variant.attrs.has("name") || variant.attrs.has("version") {
            cx.error_spanned_by(
                variant.ident,
                "a variant of a group takes no `name` or `version`: the event type it holds \
                 keeps its own; set them on that type's #[domain_event]",
            );
        }
        for span in variant.fields.iter().filter_map(|f| f.attrs.aggregate_id) {
            cx.error_at(
                span,
                "`aggregate_id` goes on a field of the member's own type, not on a variant of a \
                 group: the group takes each member's aggregate id",
            );
        }
        let Some(member) = variant.member() else {
            cx.error_spanned_by(
                variant.ident,
                format!(
                    "each variant of a group holds one event type, like `{0}({0})`; \
                     `{0}` is not a one-field tuple variant",
                    variant.ident
                ),
            );
            continue;
        };
        let key = quote::ToTokens::to_token_stream(member).to_string();
        match seen.iter().find(|(seen, _)| *seen == key) {
            Some((_, first)) => cx.error_spanned_by(
                member,
                format!(
                    "`{key}` is already a member of this group, in variant `{first}`; \
                     each event type is a member once"
                ),
            ),
            None => seen.push((key, variant.ident)),
        }
    }
}

fn check_aggregate(cx: &Ctxt, input: &Input<'_>) {
    match &input.attrs.aggregate {
        // Given, but refused with an error of its own.
        None if input.attrs.has("aggregate") => {}
        // A group takes its members' aggregate type unless it names one.
        None if input.is_group() => {}
        None => cx.error_spanned_by(
            input.ident,
            format!(
                "missing `aggregate`: add #[domain_event(aggregate = \"...\")] to `{}`, \
                 naming the aggregate type its events belong to",
                input.ident
            ),
        ),
        Some(lit) if lit.value().trim().is_empty() => {
            cx.error_spanned_by(lit, "the aggregate type name cannot be empty")
        }
        Some(_) => {}
    }
}

/// Records an error if the event type's name is empty or has characters a name cannot
/// have; returns whether the name is valid.
fn check_name(cx: &Ctxt, event_type: &EventType) -> bool {
    let Some(problem) = name_problem(&event_type.name) else {
        return true;
    };
    if event_type.renamed {
        cx.error_at(event_type.name_span, problem);
    } else {
        cx.error_at(
            event_type.name_span,
            format!("{problem}; give it another with #[domain_event(name = \"...\")]"),
        );
    }
    false
}

/// What is wrong with an event type name, if anything.
fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an event type name cannot be empty".to_owned());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.chars().all(allowed) {
        return None;
    }
    Some(format!(
        "invalid event type name `{name}`: a name is made of ASCII letters, digits, \
         `_`, `-`, `.` and `:`, and starts with a letter"
    ))
}

fn check_aggregate_id(cx: &Ctxt, fields: &[Field<'_>]) {
    let mut marked = fields
        .iter()
        .filter_map(|f| Some((f, f.attrs.aggregate_id?)));
    let Some((first, _)) = marked.next() else {
        return;
    };
    for (_, span) in marked {
        cx.error_at(
            span,
            format!(
                "only one field can be marked `aggregate_id`; `{}` already is",
                member_name(first)
            ),
        );
    }
}

fn member_name(field: &Field<'_>) -> String {
    match &field.member {
        syn::Member::Named(ident) => ident.to_string(),
        syn::Member::Unnamed(index) => index.index.to_string(),
    }
}

fn check_serde(cx: &Ctxt, keys: &[Path], forbidden: &[&str], place: &str) {
    for key in keys {
        let Some(word) = forbidden.iter().find(|word| key.is_ident(word)) else {
            continue;
        };
        let why = if ["from", "try_from", "into"].contains(word) {
            "eventfold serializes and reads back each variant of the enum itself, which a \
             conversion through another type would hide"
        } else if place == "the enum" {
            "eventfold stores a variant's content without serde's tag and reads it back by \
             the event type name"
        } else {
            "every variant is an event type that must serialize and deserialize, and reads \
             back by its position among the variants"
        };
        cx.error_spanned_by(
            key,
            format!("#[serde({word})] is not supported on {place} of a DomainEvent: {why}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::name_problem;

    #[test]
    fn names_of_letters_digits_and_separators_are_valid() {
        for name in [
            "A",
            "Opened",
            "funds_deposited",
            "order-filled",
            "billing.v2:Paid",
        ] {
            assert_eq!(name_problem(name), None, "{name}");
        }
    }

    #[test]
    fn names_that_are_empty_start_badly_or_hold_other_characters_are_refused() {
        for name in [
            "",
            "_Opened",
            "2fa",
            "-x",
            "funds deposited",
            "Dépôt",
            "a/b",
            "a\"b",
        ] {
            assert!(name_problem(name).is_some(), "{name}");
        }
    }
}
