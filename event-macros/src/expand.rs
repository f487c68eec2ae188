//! Code generation: the `DomainEvent` impl and one registration per event type.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Path};

use crate::ast::{self, Data, EventType, Field, Input};
use crate::attr::Ctxt;
use crate::{fallback, valid};

/// The expansion of `#[derive(DomainEvent)]` on `input`: the impl, or every error found
/// together with a stub impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let model = Input::from_syn(&cx, input);
    valid::check(&cx, &model);
    match cx.check() {
        Ok(()) => expand(&model),
        Err(error) => fallback::expand(&model, error),
    }
}

/// The path generated code names the runtime by: `crate = ".."`, or `::eventfold`.
pub(crate) fn runtime_path(input: &Input<'_>) -> Path {
    input
        .attrs
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::eventfold))
}

fn expand(input: &Input<'_>) -> TokenStream {
    let krate = runtime_path(input);
    let private = quote!(#krate::__private);
    let ident = input.ident;
    let where_clause = &input.original.generics.where_clause;
    let aggregate = input
        .attrs
        .aggregate
        .as_ref()
        .expect("checked by valid::check")
        .value();

    let (event_types, body): (Vec<EventType>, TokenStream) = match &input.data {
        Data::Struct(fields) => {
            let event_type = input.struct_event_type();
            let body = struct_body(&private, &event_type, fields);
            (vec![event_type], body)
        }
        Data::Enum(data) => {
            let events: Vec<(EventType, &ast::Variant<'_>)> = data
                .variants
                .iter()
                .map(|v| (input.variant_event_type(v), v))
                .collect();
            let body = enum_body(&private, &events);
            (events.into_iter().map(|(t, _)| t).collect(), body)
        }
        Data::Union(_) => unreachable!("refused by valid::check"),
    };
    let descriptors = event_types.iter().map(|t| {
        let (name, version) = (&t.name, t.version);
        quote!(#private::EventType::new(#name, #version))
    });
    let registrations = event_types.iter().map(|t| {
        let (name, version) = (&t.name, t.version);
        quote! {
            #private::inventory::submit! {
                #private::EventRegistration::new::<#ident>(#name, #aggregate, #version)
            }
        }
    });

    quote! {
        const _: () = {
            #[automatically_derived]
            // Naming a deprecated variant here is not the user's use of it.
            #[allow(deprecated)]
            impl #private::DomainEvent for #ident #where_clause {
                const AGGREGATE_TYPE: &'static str = #aggregate;
                const EVENT_TYPES: &'static [#private::EventType] = &[#(#descriptors),*];
                #body
            }
            #(#registrations)*
        };
    }
}

fn struct_body(private: &TokenStream, event_type: &EventType, fields: &[Field<'_>]) -> TokenStream {
    let (name, version) = (&event_type.name, event_type.version);
    let aggregate_id = ast::aggregate_id_field(fields).map(|field| {
        let member = &field.member;
        let to_string =
            quote_spanned!(field.ty.span()=> #private::ToString::to_string(&self.#member));
        quote! {
            fn aggregate_id(&self) -> #private::Option<#private::String> {
                #private::Option::Some(#to_string)
            }
        }
    });
    quote! {
        fn event_type(&self) -> &'static str {
            #name
        }

        fn schema_version(&self) -> u32 {
            #version
        }

        #aggregate_id

        fn to_payload(&self) -> #private::serde_json::Result<#private::String> {
            #private::serde_json::to_string(self)
        }

        fn __deserialize_payload<'de, __D>(
            __event_type: &str,
            __deserializer: __D,
        ) -> #private::Result<Self, __D::Error>
        where
            __D: #private::serde::Deserializer<'de>,
        {
            if __event_type == #name {
                <Self as #private::serde::Deserialize>::deserialize(__deserializer)
            } else {
                #private::Result::Err(
                    <__D::Error as #private::serde::de::Error>::unknown_variant(
                        __event_type,
                        &[#name],
                    ),
                )
            }
        }
    }
}

fn enum_body(private: &TokenStream, events: &[(EventType, &ast::Variant<'_>)]) -> TokenStream {
    let patterns: Vec<TokenStream> = events
        .iter()
        .map(|(_, variant)| {
            let ident = variant.ident;
            quote!(Self::#ident { .. })
        })
        .collect();
    let names: Vec<&String> = events.iter().map(|(t, _)| &t.name).collect();
    let versions = events.iter().map(|(t, _)| t.version);
    let indexes = (0..events.len()).map(|i| i as u32);

    let id_arms: Vec<TokenStream> = events
        .iter()
        .filter_map(|(_, variant)| {
            let field = ast::aggregate_id_field(&variant.fields)?;
            let (ident, member) = (variant.ident, &field.member);
            let to_string = quote_spanned!(field.ty.span()=> #private::ToString::to_string(__id));
            Some(quote! {
                Self::#ident { #member: __id, .. } => #private::Option::Some(#to_string),
            })
        })
        .collect();
    let aggregate_id = (!id_arms.is_empty()).then(|| {
        let rest = (id_arms.len() < events.len()).then(|| quote!(_ => #private::Option::None,));
        quote! {
            fn aggregate_id(&self) -> #private::Option<#private::String> {
                match self {
                    #(#id_arms)*
                    #rest
                }
            }
        }
    });

    quote! {
        fn event_type(&self) -> &'static str {
            match self {
                #(#patterns => #names,)*
            }
        }

        fn schema_version(&self) -> u32 {
            match self {
                #(#patterns => #versions,)*
            }
        }

        #aggregate_id

        fn to_payload(&self) -> #private::serde_json::Result<#private::String> {
            #private::enum_payload(self)
        }

        fn __deserialize_payload<'de, __D>(
            __event_type: &str,
            __deserializer: __D,
        ) -> #private::Result<Self, __D::Error>
        where
            __D: #private::serde::Deserializer<'de>,
        {
            match __event_type {
                #(#names => #private::deserialize_variant::<Self, __D>(__deserializer, #indexes),)*
                _ => #private::Result::Err(
                    <__D::Error as #private::serde::de::Error>::unknown_variant(
                        __event_type,
                        &[#(#names),*],
                    ),
                ),
            }
        }
    }
}
