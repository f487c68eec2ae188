use eventfold::DomainEvent;

#[derive(DomainEvent)]
#[domain_event(aggregate = "Account")]
union AccountEvent {
    amount: u64,
    cents: u32,
}

fn main() {}
