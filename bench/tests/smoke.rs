//! The benchmark code still works: a micro-size run of a few scenarios against both
//! systems (debug cache binary), checked for complete, failure-free tables.

use std::time::Duration;

use regmirror_bench::{Config, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_benchmark_produces_complete_tables() {
    let cfg = Config::micro(
        regmirror_e2e::cache_binary(),
        env!("CARGO_BIN_EXE_regmirror-bench").into(),
    );
    let wanted = cfg.scenarios.len();
    let report = tokio::time::timeout(Duration::from_secs(120), run(cfg))
        .await
        .expect("micro benchmark timed out")
        .expect("micro benchmark failed");
    assert_eq!(report.sections.len(), wanted, "{}", report.markdown);
    for sec in &report.sections {
        assert!(
            !sec.notes.iter().any(|n| n.contains("scenario failed")),
            "{}",
            report.markdown
        );
        assert!(!sec.rows.is_empty(), "{} has no rows", sec.title);
        for row in &sec.rows {
            // Rows judged on ours alone (a ratio to the reference measured
            // in the same run) have no distribution samples by design, and
            // a physical limit (SHA-256 on one core) only reference ones.
            let ours_only = row
                .target
                .as_ref()
                .is_some_and(|(_, check)| !check.needs_distribution());
            let reference_only =
                row.ours.is_empty() && row.dist.is_empty() && !row.reference.is_empty();
            assert!(
                reference_only || (!row.ours.is_empty() && (ours_only || !row.dist.is_empty())),
                "{}: {} lacks samples",
                sec.title,
                row.metric
            );
        }
    }
    // Scenario 1's separate-process clients ran (make test installs crane),
    // against the sendfile reference and the copying one.
    for client in ["curl", "crane"] {
        for metric in [
            "server CPU-s per GiB",
            "throughput GB/s from a copying server",
            "client CPU-s per GiB from a copying server",
        ] {
            assert!(
                report.markdown.contains(&format!("via {client}: {metric}")),
                "{client}: {metric}: {}",
                report.markdown
            );
        }
    }
    assert!(report.markdown.contains("## Machine"));
    assert!(
        report
            .markdown
            .contains("| scenario | metric | target | holds |")
    );
}
