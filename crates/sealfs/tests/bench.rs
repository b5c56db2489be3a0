//! `sealfs bench` on a folder of the local disk, at small sizes: every phase runs, checks what
//! it reads back, reports a figure and leaves nothing behind; bad arguments are refused.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sealfs"))
        .arg("bench")
        .args(args)
        .env("SEALFS_LOG", "error")
        .output()
        .expect("run sealfs bench")
}

#[test]
fn bench_runs_every_phase_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let me = std::process::id().to_string();
    let out = bench(&[
        dir.path().to_str().unwrap(),
        "--size",
        "4M",
        "--iops-size",
        "1M",
        "--seconds",
        "1",
        "--files",
        "50",
        "--small-files",
        "5",
        "--json",
        json.to_str().unwrap(),
        "--label",
        "local",
        "--watch-pid",
        &me,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let figures = doc["figures"].as_array().unwrap();
    // 2 transfer sizes x 2 layouts x write and read, 2 IOPS, 2 x 4 metadata, 1 small.
    assert_eq!(figures.len(), 8 + 2 + 8 + 1, "{doc}");
    for f in figures {
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert!(stdout.contains(f["workload"].as_str().unwrap()), "{stdout}");
    }
    assert_eq!(doc["label"], "local");
    assert!(doc["watched_rss_peak_bytes"].as_u64().unwrap() > 0);
    // Only the JSON is left in the folder.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
    assert_eq!(left.len(), 1, "{left:?}");

    // A memory bound the watched process passes fails the run, after the table.
    let out = bench(&[
        dir.path().to_str().unwrap(),
        "--phases",
        "metadata",
        "--files",
        "10",
        "--watch-pid",
        &me,
        "--rss-max",
        "1K",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("over the bound"));
}

#[test]
fn bench_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (args, says) in [
        (vec![d, "--streams", "0"], "--streams must be"),
        (
            vec![d, "--phases", "bandwidth,warp"],
            "unknown phase \"warp\"",
        ),
        (vec!["/no/such/folder"], "is not a folder"),
        (vec![d, "--size", "12Q"], "use a number"),
    ] {
        let out = bench(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
