//! `ledger`: the component's accounts in the node's [`keel_ledger::Ledger`]
//! (strong, linearizable per account; see that crate for the protocol).

use super::WitError;
use crate::state::HostState;
use keel_ledger::{AccountKey, LedgerError};
use keel_world::bindings::keel::platform::ledger;

type R<T> = wasmtime::Result<Result<T, WitError>>;

fn wit(e: LedgerError) -> WitError {
    match e {
        LedgerError::Invalid(m) => WitError::Invalid(m),
        LedgerError::Conflict(m) => WitError::Conflict(m),
        LedgerError::Unavailable(m) => WitError::Unavailable(m),
        LedgerError::Internal(m) => {
            tracing::error!(error = %m, "ledger internal error");
            WitError::Internal(m)
        }
    }
}

fn entry(e: keel_ledger::Entry) -> ledger::Entry {
    ledger::Entry {
        account: e.account,
        sequence: e.sequence,
        amount: e.amount,
        balance: e.balance,
        idempotency_key: e.idempotency_key,
        at_ms: e.at_ms,
        replayed: e.replayed,
    }
}

impl ledger::Host for HostState {
    async fn append(
        &mut self,
        account: String,
        amount: i64,
        idempotency_key: String,
    ) -> R<ledger::Entry> {
        let c = self.component();
        let key = AccountKey::new(c.ns.as_str(), &account);
        Ok(c.services
            .ledger
            .append(&key, amount, &idempotency_key)
            .await
            .map(entry)
            .map_err(wit))
    }

    async fn balance(&mut self, account: String) -> R<i64> {
        let c = self.component();
        let key = AccountKey::new(c.ns.as_str(), &account);
        Ok(c.services.ledger.balance(&key).await.map_err(wit))
    }

    async fn history(
        &mut self,
        account: String,
        cursor: Option<u64>,
        limit: u32,
    ) -> R<ledger::EntryPage> {
        let c = self.component();
        let key = AccountKey::new(c.ns.as_str(), &account);
        Ok(c.services
            .ledger
            .history(&key, cursor, limit)
            .await
            .map(|p| ledger::EntryPage {
                entries: p.entries.into_iter().map(entry).collect(),
                next_cursor: p.next_cursor,
            })
            .map_err(wit))
    }
}
