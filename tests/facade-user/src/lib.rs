//! A crate that uses eventfold as an application does: its only dependencies are
//! `eventfold` and `serde`, and it forbids unsafe code. That it builds, and that the
//! registry sees its events, proves the derive needs nothing else from the user.

#![forbid(unsafe_code)]

use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

/// The events of a library loan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Loan")]
pub enum LoanEvent {
    /// A book was lent.
    Lent {
        /// The loan.
        #[domain_event(aggregate_id)]
        loan_id: String,
        /// Who borrowed it.
        reader: String,
    },
    /// The book came back.
    #[domain_event(name = "LoanReturned", version = 2)]
    Returned {
        /// The loan.
        #[domain_event(aggregate_id)]
        loan_id: String,
        /// Days past the due date.
        days_late: u32,
    },
}

/// A book was added to the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Catalogue", name = "BookCatalogued")]
pub struct BookCatalogued {
    /// The book.
    #[domain_event(aggregate_id)]
    pub isbn: String,
    /// Its title.
    pub title: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventfold::registry;

    #[test]
    fn the_registry_sees_this_crates_events() {
        registry()
            .expect(["Lent", "LoanReturned", "BookCatalogued"])
            .unwrap();
        registry().expect_type::<LoanEvent>().unwrap();
        let returned = registry().get("LoanReturned").unwrap();
        assert_eq!(returned.aggregate_type, "Loan");
        assert_eq!(returned.version, 2);
        assert_eq!(returned.rust_type, std::any::type_name::<LoanEvent>());
        assert_eq!(
            registry().get("BookCatalogued").unwrap().aggregate_type,
            "Catalogue"
        );
    }

    #[test]
    fn events_round_trip_through_the_registry() {
        let returned = LoanEvent::Returned {
            loan_id: "loan-1".into(),
            days_late: 3,
        };
        assert_eq!(returned.aggregate_id().as_deref(), Some("loan-1"));
        let payload = returned.to_payload().unwrap();
        assert_eq!(payload, r#"{"loan_id":"loan-1","days_late":3}"#);
        let back: LoanEvent = registry().decode("LoanReturned", 2, &payload).unwrap();
        assert_eq!(back, returned);

        let book = BookCatalogued {
            isbn: "978-0".into(),
            title: "Dune".into(),
        };
        let back: BookCatalogued = registry()
            .decode("BookCatalogued", 1, &book.to_payload().unwrap())
            .unwrap();
        assert_eq!(back, book);
    }
}
