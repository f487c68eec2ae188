//! Code generation: the `DomainEvent` impl and one registration per event type, or for a
//! group the impl that delegates to its members, with compile-time checks of the members.

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident, Path, Type};

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
    if input.is_group() {
        return expand_group(input);
    }
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
            #private::struct_payload(self)
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

/// A group: `DomainEvent` by delegation to the member each variant holds, `From` each
/// member, and compile-time checks that the members share the group's aggregate type and no
/// event type name. It registers nothing: its members do.
fn expand_group(input: &Input<'_>) -> TokenStream {
    let krate = runtime_path(input);
    let private = quote!(#krate::__private);
    let ident = input.ident;
    let where_clause = &input.original.generics.where_clause;
    let Data::Enum(data) = &input.data else {
        unreachable!("checked by valid::check")
    };
    let variants: Vec<(&Ident, &Type)> = data
        .variants
        .iter()
        .map(|v| (v.ident, v.member().expect("checked by valid::check")))
        .collect();
    // Each member's impl, named at the member's own tokens, so that an error about the
    // member (not a DomainEvent, another aggregate) points there.
    let impls: Vec<TokenStream> = variants
        .iter()
        .map(|(_, ty)| quote_spanned!(ty.span()=> <#ty as #private::DomainEvent>))
        .collect();
    let arms: Vec<TokenStream> = variants
        .iter()
        .map(|(variant, _)| quote!(Self::#variant(__member)))
        .collect();
    let variant_idents: Vec<&Ident> = variants.iter().map(|(v, _)| *v).collect();

    let (aggregate, checked, against) = match &input.attrs.aggregate {
        Some(lit) => (quote!(#lit), &variants[..], format!("`{}`", lit.value())),
        None => {
            let first = &impls[0];
            let first_name = variants[0].1.to_token_stream().to_string();
            (
                quote!(#first::AGGREGATE_TYPE),
                &variants[1..],
                format!("that of the group's first member `{first_name}`"),
            )
        }
    };
    let aggregate_checks = checked.iter().map(|(_, ty)| {
        let message = format!(
            "`{}` is an event of another aggregate type than {against}: every member of the \
             group `{ident}` belongs to one aggregate",
            ty.to_token_stream()
        )
        // A literal format string: braces in a type's tokens are not placeholders.
        .replace('{', "{{")
        .replace('}', "}}");
        quote_spanned! {ty.span()=>
            const _: () = ::core::assert!(
                #private::str_eq(
                    <#ty as #private::DomainEvent>::AGGREGATE_TYPE,
                    <#ident as #private::DomainEvent>::AGGREGATE_TYPE,
                ),
                #message,
            );
        }
    });
    let from_impls = group_from_impls(input, &private);
    let distinct_message = format!(
        "two members of the group `{ident}` share an event type name; \
         each event type is a member once"
    );
    let not_a_member = format!("event type `{{}}` is not one of the members of `{ident}`");

    quote! {
        const _: () = {
            #[automatically_derived]
            // Naming a deprecated variant here is not the user's use of it.
            #[allow(deprecated)]
            impl #private::DomainEvent for #ident #where_clause {
                const AGGREGATE_TYPE: &'static str = #aggregate;
                const EVENT_TYPES: &'static [#private::EventType] =
                    &#private::concat_event_types::<{ 0 #(+ #impls::EVENT_TYPES.len())* }>(
                        &[#(#impls::EVENT_TYPES),*],
                    );

                fn event_type(&self) -> &'static str {
                    match self {
                        #(#arms => #impls::event_type(__member),)*
                    }
                }

                fn schema_version(&self) -> u32 {
                    match self {
                        #(#arms => #impls::schema_version(__member),)*
                    }
                }

                fn aggregate_id(&self) -> #private::Option<#private::String> {
                    match self {
                        #(#arms => #impls::aggregate_id(__member),)*
                    }
                }

                fn to_payload(&self) -> #private::serde_json::Result<#private::String> {
                    match self {
                        #(#arms => #impls::to_payload(__member),)*
                    }
                }

                fn __deserialize_payload<'de, __D>(
                    __event_type: &str,
                    __deserializer: __D,
                ) -> #private::Result<Self, __D::Error>
                where
                    __D: #private::serde::Deserializer<'de>,
                {
                    #(
                        if #private::has_event_type(#impls::EVENT_TYPES, __event_type) {
                            return #private::Result::map(
                                #impls::__deserialize_payload(__event_type, __deserializer),
                                Self::#variant_idents,
                            );
                        }
                    )*
                    #private::Result::Err(<__D::Error as #private::serde::de::Error>::custom(
                        ::core::format_args!(#not_a_member, __event_type),
                    ))
                }

                fn __decodes_from(__registered: #private::TypeId) -> bool {
                    false #(|| #impls::__decodes_from(__registered))*
                }
            }

            #from_impls

            #(#aggregate_checks)*
            const _: () = ::core::assert!(
                #private::names_are_distinct(<#ident as #private::DomainEvent>::EVENT_TYPES),
                #distinct_message,
            );
        };
    }
}

/// `From` each member for a group: for every newtype variant whose member no earlier
/// variant holds (the derive's fallback emits them too, so that a mistake in one variant
/// does not turn every `.into()` into an error).
pub(crate) fn group_from_impls(input: &Input<'_>, private: &TokenStream) -> TokenStream {
    let Data::Enum(data) = &input.data else {
        return TokenStream::new();
    };
    let ident = input.ident;
    let where_clause = &input.original.generics.where_clause;
    let mut seen: Vec<String> = Vec::new();
    let mut impls = TokenStream::new();
    for variant in &data.variants {
        let Some(ty) = variant.member() else {
            continue;
        };
        let key = ty.to_token_stream().to_string();
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let variant = variant.ident;
        // At the member's tokens: two names of one type (an alias) conflict there.
        impls.extend(quote_spanned! {ty.span()=>
            #[automatically_derived]
            impl #private::From<#ty> for #ident #where_clause {
                fn from(__member: #ty) -> Self {
                    Self::#variant(__member)
                }
            }
        });
    }
    impls
}
