//! The audit trail on the embedded node: global operations append to one
//! hash chain in the node's ledger database; `keel audit verify` checks it
//! and names the record an edit broke. (The multi-region chain and a forged
//! record are tested in `regions::regional_coordination_spans_the_edges_of_a_region`.)

use crate::support::*;
use serde_json::json;

/// The record count `keel audit verify` reports.
pub(crate) fn verified_records(node: &Node) -> u64 {
    let (code, out, err) = node.audit_verify();
    assert_eq!(code, 0, "keel audit verify: {out}{err}");
    out.split_whitespace()
        .skip_while(|w| *w != "intact:")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {out}"))
}

#[test]
fn embedded_global_operations_are_audited_and_an_edited_record_is_named() {
    let node = Node::new(&component(
        "reg",
        "regional-probe",
        "/reg/...",
        r#"grants = ["regional-coordination", "global-coordination", "edge-operations", "kv"]"#,
    ));
    let keel = node.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for i in 0..4 {
            let r = keel
                .post(
                    "/reg/global/search",
                    json!({"name_prefix": format!("n{i}"), "limit": 5}).to_string(),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let r = keel
            .post("/reg/global/query", json!({"topology": null}).to_string())
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        // A refused call is audited with its outcome too.
        let r = keel
            .post("/reg/global/search", json!({"limit": 0}).to_string())
            .await;
        assert_eq!(r.status, 400, "{}", r.body);
    });
    // Verify reads the chain while the node runs, and after it stopped.
    assert_eq!(verified_records(&node), 6);
    keel.stop();
    assert_eq!(verified_records(&node), 6);

    // Edit record 3's outcome in the database.
    let db = node.dir.path().join(".keel/ledger/ledger.sqlite");
    let c = rusqlite::Connection::open(&db).unwrap();
    let (position, record): (i64, Vec<u8>) = c
        .query_row(
            "SELECT position, record FROM ledger_records WHERE account = 'audit' ORDER BY position LIMIT 1 OFFSET 2",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(v["seq"], 3);
    assert_eq!(v["operation"], "search-global-users");
    v["outcome"] = "error: denied".into();
    c.execute(
        "UPDATE ledger_records SET record = ?1 WHERE position = ?2",
        rusqlite::params![serde_json::to_vec(&v).unwrap(), position],
    )
    .unwrap();
    drop(c);
    let (code, out, err) = node.audit_verify();
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("log position {position} (chain seq 3)")) && err.contains("altered"),
        "{err}"
    );
}
