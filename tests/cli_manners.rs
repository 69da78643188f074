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

/// `--help` of a command shows its own flags first, then the store's.
#[test]
fn help_lists_a_commands_own_flags_first() {
    for (cmd, own) in [
        ("mount", "--allow-other"),
        ("virtiofs", "--socket-path"),
        ("daemon", "--listen"),
        ("path-info", "--json"),
    ] {
        let help = String::from_utf8(cli_ok(&[cmd, "--help"])).unwrap();
        let at = |s: &str| {
            help.find(s)
                .unwrap_or_else(|| panic!("{cmd}: no {s} in\n{help}"))
        };
        assert!(at(own) < at("Store options:"), "{cmd}:\n{help}");
        assert!(
            at("Store options:") < at("--store <STORE>"),
            "{cmd}:\n{help}"
        );
        assert!(at("--store <STORE>") < at("--log-level"), "{cmd}:\n{help}");
    }
}

/// `--version` names the wire protocols and the build.
#[test]
fn version_names_the_wire_and_the_build() {
    let v = String::from_utf8(cli_ok(&["--version"])).unwrap();
    for want in [
        "tvix.castore.v1",
        "tvix.store.v1",
        "snix.castore.v1",
        "snix.store.v1",
        "vhost-user",
        "build: ",
    ] {
        assert!(v.contains(want), "no {want:?} in\n{v}");
    }
}

/// The bash completion script loads in bash and completes subcommands and
/// flags; the manual pages render with man(1) and hold every flag.
#[test]
fn completions_and_man_pages_come_from_the_flags() {
    common::require_tools(&[("bash", "bash"), ("man", "man-db")]);
    let script = String::from_utf8(cli_ok(&["completions", "bash"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("completion.bash");
    std::fs::write(&f, script).unwrap();
    let complete =
        |line: &str| {
            let words: Vec<&str> = line.split(' ').collect();
            let cmd =
                format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
             _tvix__virtiofsd tvix-virtiofsd '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            f.display(),
            words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
            let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
            assert!(out.status.success(), "{cmd}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
    let subs = complete("tvix-virtiofsd mo");
    assert!(subs.lines().any(|l| l == "mount"), "{subs}");
    let flags = complete("tvix-virtiofsd mount --allow");
    assert!(flags.lines().any(|l| l == "--allow-other"), "{flags}");

    let out =
        String::from_utf8(cli_ok(&["man", dir.path().join("man").to_str().unwrap()])).unwrap();
    assert!(out.lines().count() >= 9, "one page per command:\n{out}");
    let page = dir.path().join("man/tvix-virtiofsd-mount.1");
    let text = common::sh(&format!("MANWIDTH=200 man -l {} | col -b", page.display()));
    for flag in [
        "--allow-other",
        "--store-timeout",
        "--max-handles",
        "--store",
        "--cache-dir",
    ] {
        assert!(
            text.contains(flag),
            "{flag} missing from the mount page:\n{text}"
        );
    }
}
