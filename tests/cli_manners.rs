//! The command line as a Unix tool: a reader that goes away (`| head`) ends
//! the command quietly, as SIGPIPE ends other tools, with nothing on stderr.
mod common;

use common::cli_ok;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

/// Runs the command with its stdout a pipe whose reading end is closed
/// before it writes; answers its exit status and stderr.
fn with_reader_gone(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(common::bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_pipe_ends_commands_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("local://{}", dir.path().join("store").display());
    let f = dir.path().join("big");
    std::fs::write(&f, common::pseudo_random(1 << 20, 1)).unwrap();
    let path = String::from_utf8(cli_ok(&["--store", &store, "import", f.to_str().unwrap()]))
        .unwrap()
        .trim()
        .to_string();
    let many: Vec<&str> = std::iter::repeat_n(path.as_str(), 200).collect();
    let mut path_info = vec!["--store", &store, "path-info"];
    path_info.extend(&many);
    let mut json = path_info.clone();
    json.push("--json");
    for args in [
        vec!["--store", &store, "nar", &path],
        path_info,
        json,
        vec!["--store", &store, "import", f.to_str().unwrap()],
    ] {
        let (status, stderr) = with_reader_gone(&args);
        let args = &args[2..4];
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {status}, stderr: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("rror"),
            "{args:?} wrote to stderr: {stderr}"
        );
    }
}
