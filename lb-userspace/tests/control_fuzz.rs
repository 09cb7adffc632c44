//! Fuzz target (proptest) for the control-socket protocol: request lines of arbitrary
//! bytes, arbitrary JSON, and mutations of real commands, sent to the real server
//! (`control::serve_with`) with a stand-in for the daemon loop. Every request gets exactly
//! one JSON reply line; anything that is not a command gets an error; commands reach the
//! daemon loop intact; the server keeps serving. Cases: `MLB_FUZZ_CASES` (default 1000).
//! Requests that once failed live in `tests/data/fuzz/control/*.txt` (one a line, `\n`
//! escapes allowed) and are replayed first. No privileges needed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_userspace::control::{self, Command, Limits, Reply};
use proptest::{prelude::*, test_runner::FileFailurePersistence};
use tokio::sync::mpsc;

const MAX_REQUEST: usize = 4096;

struct Bench {
    _runtime: tokio::runtime::Runtime,
    _server: control::Server,
    path: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The real server on a socket of this process, answering every command with its own
/// JSON (so the test sees what reached the daemon loop).
fn bench() -> Bench {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("mlb-control-fuzz-{}-{n}.sock", std::process::id()));
    let (tx, mut rx) = mpsc::channel::<(Command, tokio::sync::oneshot::Sender<Reply>)>(16);
    let limits = Limits {
        max_request: MAX_REQUEST,
        timeout: Duration::from_secs(2),
        max_connections: 8,
        group: None,
    };
    let server = runtime
        .block_on(async { control::serve_with(&path, tx, limits) })
        .unwrap();
    runtime.spawn(async move {
        while let Some((command, reply)) = rx.recv().await {
            let _ = reply.send(Reply::Ok(serde_json::to_string(&command).unwrap()));
        }
    });
    Bench {
        _runtime: runtime,
        _server: server,
        path,
    }
}

fn exchange(path: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(request);
    // The client is done: a request without a newline ends here, not by timeout.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

fn check(path: &Path, request: &[u8]) -> Result<(), TestCaseError> {
    let line = exchange(path, request);
    prop_assert!(
        line.ends_with('\n'),
        "no reply line for {request:?}: {line:?}"
    );
    let reply: Reply = serde_json::from_str(&line)
        .map_err(|e| TestCaseError::fail(format!("reply {line:?} is not a Reply: {e}")))?;
    // What the server should have seen: one line, within the limit, that is a command.
    let first = request.split(|&b| b == b'\n').next().unwrap();
    let complete = request.len() > first.len() && first.len() < MAX_REQUEST;
    let command = complete
        .then(|| serde_json::from_slice::<Command>(first).ok())
        .flatten();
    match (command, reply) {
        (Some(command), Reply::Ok(echo)) => {
            prop_assert_eq!(echo, serde_json::to_string(&command).unwrap())
        }
        (None, Reply::Error(why)) => prop_assert!(!why.is_empty()),
        (command, reply) => {
            return Err(TestCaseError::fail(format!(
                "{request:?}: command {command:?} answered {reply:?}"
            )));
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("MLB_FUZZ_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        source_file: Some(file!()),
        ..ProptestConfig::default()
    }
}

fn valid() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#"{"command":"status"}"#.to_owned()),
        (any::<[u8; 4]>(), any::<bool>()).prop_map(|(a, d)| format!(
            r#"{{"command":"drain","address":"{}.{}.{}.{}","drained":{d}}}"#,
            a[0], a[1], a[2], a[3]
        )),
        any::<bool>().prop_map(|on| format!(r#"{{"command":"maintenance","on":{on}}}"#)),
    ]
}

/// A JSON value of any shape, keys biased towards the protocol's.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "(status|drain|maintenance|command|address|drained|on|10\\.0\\.0\\.1|fd00::1|.{0,8})"
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("(command|address|drained|on|reply|.{0,6})", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn the_regression_corpus_is_answered() {
    let bench = bench();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/control");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "txt"))
    {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            if line.starts_with('#') {
                continue;
            }
            let request = line.replace("\\n", "\n");
            check(&bench.path, request.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {line:?}: {e}", file.display()));
        }
    }
}

#[test]
fn any_request_gets_one_well_formed_reply() {
    let bench = bench();
    let requests = prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            json().prop_map(|v| format!("{v}\n").into_bytes()),
            (
                valid(),
                any::<prop::sample::Index>(),
                "[^\n]{0,3}",
                any::<bool>()
            )
                .prop_map(|(text, at, piece, newline)| {
                    let mut bytes = text.into_bytes();
                    let at = at.index(bytes.len() + 1);
                    bytes.splice(at..at, piece.into_bytes());
                    if newline {
                        bytes.push(b'\n');
                    }
                    bytes
                }),
            valid().prop_map(|v| format!("{v}\n").into_bytes()),
            (1usize..3).prop_map(|k| vec![b'{'; k * MAX_REQUEST]),
        ],
        1..8,
    );
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&requests, |requests| {
        for request in requests {
            check(&bench.path, &request)?;
        }
        Ok(())
    });
    drop(bench);
    if let Err(e) = result {
        panic!("{e}");
    }
}
