//! What the derive emits when the input has errors: the errors, and a stub impl so that
//! code using the type as a `DomainEvent` does not add a cascade of errors of its own.

use proc_macro2::TokenStream;
use quote::quote;

use crate::ast::{Data, Input};
use crate::expand::{group_from_impls, runtime_path};

/// The errors, and a stub `DomainEvent` impl for a non-generic struct or enum whose
/// runtime path is known (for a group, with its `From` impls).
pub(crate) fn expand(input: &Input<'_>, error: syn::Error) -> TokenStream {
    let error = error.into_compile_error();
    let generics = &input.original.generics;
    if matches!(input.data, Data::Union(_))
        || !generics.params.is_empty()
        || (input.attrs.has("crate") && input.attrs.krate.is_none())
    {
        return error;
    }
    let krate = runtime_path(input);
    let private = quote!(#krate::__private);
    let ident = input.ident;
    let where_clause = &generics.where_clause;
    let message = format!("`{ident}` did not compile as a DomainEvent");
    let from_impls = if input.is_group() {
        group_from_impls(input, &private)
    } else {
        TokenStream::new()
    };
    quote! {
        #error
        const _: () = {
            #[automatically_derived]
            impl #private::DomainEvent for #ident #where_clause {
                const AGGREGATE_TYPE: &'static str = "";
                const EVENT_TYPES: &'static [#private::EventType] = &[];

                fn event_type(&self) -> &'static str {
                    ""
                }

                fn schema_version(&self) -> u32 {
                    0
                }

                fn to_payload(&self) -> #private::serde_json::Result<#private::String> {
                    #private::Result::Err(
                        <#private::serde_json::Error as #private::serde::ser::Error>::custom(#message),
                    )
                }

                fn __deserialize_payload<'de, __D>(
                    _: &str,
                    _: __D,
                ) -> #private::Result<Self, __D::Error>
                where
                    __D: #private::serde::Deserializer<'de>,
                {
                    #private::Result::Err(<__D::Error as #private::serde::de::Error>::custom(#message))
                }
            }
            #from_impls
        };
    }
}
