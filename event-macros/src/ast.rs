//! The model of a type deriving `DomainEvent`: its attributes parsed, its event types
//! resolved (names and versions with their defaults applied).

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data as SynData, DeriveInput, Fields, Ident, Member, Path, Type};

use crate::attr::{self, Attrs, Ctxt, Position};

/// A type deriving `DomainEvent`.
pub(crate) struct Input<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) original: &'a DeriveInput,
    pub(crate) attrs: Attrs,
    pub(crate) data: Data<'a>,
}

pub(crate) enum Data<'a> {
    /// A struct: one event type.
    Struct(Vec<Field<'a>>),
    /// An enum: one event type per variant.
    Enum(Enum<'a>),
    /// A union, which is refused.
    Union(&'a syn::DataUnion),
}

pub(crate) struct Enum<'a> {
    /// The keys of the enum's `#[serde(...)]` attributes.
    pub(crate) serde_keys: Vec<Path>,
    pub(crate) variants: Vec<Variant<'a>>,
}

pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) attrs: Attrs,
    /// The keys of the variant's `#[serde(...)]` attributes.
    pub(crate) serde_keys: Vec<Path>,
    pub(crate) fields: Vec<Field<'a>>,
}

pub(crate) struct Field<'a> {
    /// The field's name or index.
    pub(crate) member: Member,
    pub(crate) ty: &'a Type,
    pub(crate) attrs: Attrs,
}

/// One event type, with its defaults applied.
pub(crate) struct EventType {
    /// The stored name.
    pub(crate) name: String,
    /// What the name came from: the `name = ".."` literal or the Rust identifier.
    pub(crate) name_span: Span,
    /// Whether the name was given with `name = ".."`.
    pub(crate) renamed: bool,
    pub(crate) version: u32,
}

impl<'a> Input<'a> {
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Self {
        // Attributes are parsed in source order, so that errors are reported in it too.
        let (attrs, data) = match &input.data {
            SynData::Struct(data) => {
                let attrs = attr::parse(cx, &input.attrs, Position::Struct);
                (attrs, Data::Struct(fields(cx, &data.fields)))
            }
            SynData::Enum(data) => {
                let attrs = attr::parse(cx, &input.attrs, Position::Enum);
                let variants = data
                    .variants
                    .iter()
                    .map(|v| Variant {
                        ident: &v.ident,
                        attrs: attr::parse(cx, &v.attrs, Position::Variant),
                        serde_keys: attr::serde_keys(&v.attrs),
                        fields: fields(cx, &v.fields),
                    })
                    .collect();
                let serde_keys = attr::serde_keys(&input.attrs);
                (
                    attrs,
                    Data::Enum(Enum {
                        serde_keys,
                        variants,
                    }),
                )
            }
            // A union is refused whatever its attributes say.
            SynData::Union(data) => (Attrs::default(), Data::Union(data)),
        };
        Input {
            ident: &input.ident,
            original: input,
            attrs,
            data,
        }
    }

    /// Whether this is a group: an enum whose variants each hold one event type of its own
    /// (`#[domain_event(group)]`, even with a value refused: its checks apply).
    pub(crate) fn is_group(&self) -> bool {
        self.attrs.has("group")
    }

    /// The version an event type has unless it says otherwise.
    fn default_version(&self) -> u32 {
        self.attrs.version.unwrap_or(1)
    }

    /// The event type of a struct.
    pub(crate) fn struct_event_type(&self) -> EventType {
        event_type(self.ident, &self.attrs, self.default_version())
    }

    /// The event type of a variant of this enum.
    pub(crate) fn variant_event_type(&self, variant: &Variant<'_>) -> EventType {
        event_type(variant.ident, &variant.attrs, self.default_version())
    }
}

fn event_type(ident: &Ident, attrs: &Attrs, default_version: u32) -> EventType {
    let (name, name_span, renamed) = match &attrs.name {
        Some(lit) => (lit.value(), lit.span(), true),
        None => (ident.unraw().to_string(), ident.span(), false),
    };
    EventType {
        name,
        name_span,
        renamed,
        version: attrs.version.unwrap_or(default_version),
    }
}

fn fields<'a>(cx: &Ctxt, fields: &'a Fields) -> Vec<Field<'a>> {
    fields
        .iter()
        .enumerate()
        .map(|(index, field)| Field {
            member: match &field.ident {
                Some(ident) => Member::Named(ident.clone()),
                None => Member::Unnamed(syn::Index {
                    index: index as u32,
                    span: field.ty.span(),
                }),
            },
            ty: &field.ty,
            attrs: attr::parse(cx, &field.attrs, Position::Field),
        })
        .collect()
}

impl<'a> Variant<'a> {
    /// The type a variant of a group holds: its only field, if it is a newtype variant.
    pub(crate) fn member(&self) -> Option<&'a Type> {
        match self.fields.as_slice() {
            [field] if matches!(field.member, Member::Unnamed(_)) => Some(field.ty),
            _ => None,
        }
    }
}

/// The field marked `aggregate_id` (the first, if several are).
pub(crate) fn aggregate_id_field<'b, 'a>(fields: &'b [Field<'a>]) -> Option<&'b Field<'a>> {
    fields.iter().find(|f| f.attrs.aggregate_id.is_some())
}
