//! The store tier on object storage, with a real microVM (QEMU under TCG)
//! and a real three-node Garage cluster (replication 3): a writable store
//! daemon copies the fixture closure into the bucket; two read-only store
//! daemons serve the same bucket, each through a node of its own; a host
//! cache daemon's remote is both (`--store A,B`); a sandboxed per-VM daemon
//! serves the guest. The guest reads store paths it has not read before
//! while the test breaks things under it, at the lines it prints.
mod common;

use common::garage::Garage;
use common::vm::{
    closure_of, fixture_app, fixture_data, host_digest, line_after, require_vm_tools, run_vm,
    wait_exit, VmOpts, DIGEST_SCRIPT,
};
use common::{bin, cli_ok, free_port, pseudo_random};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// A store daemon as a process of its own, its stderr in a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], log: PathBuf) -> Proc {
        let child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    /// A store daemon over `store` on 127.0.0.1, waited for; answers it
    /// and its gRPC address.
    fn daemon(store: &str, extra: &[&str], log: PathBuf) -> (Proc, String) {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--store", store, "daemon", "--listen", &listen];
        args.extend(["--min-free-space", "16M"]);
        args.extend(extra);
        let p = Proc::spawn(&args, log);
        p.wait_tcp(&listen);
        (p, format!("grpc+http://{listen}"))
    }

    fn wait_tcp(&self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "not listening: {}",
                read_log(&self.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A store path of one pseudo-random 600 KB file `big` and a small one,
/// added through `store`; answers the path, the sha256 of big then small,
/// and big's BLAKE3 (its blob's name in the bucket).
fn store_path(root: &Path, store: &str, name: &str, seed: u64) -> (String, String, String) {
    use sha2::Digest;
    let src = root.join(name);
    std::fs::create_dir_all(&src).unwrap();
    let big = pseudo_random(600_000, seed);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("small"), format!("{name}\n")).unwrap();
    let out = cli_ok(&["--store", store, "import", src.to_str().unwrap()]);
    let path = String::from_utf8(out).unwrap().trim().to_string();
    let mut h = sha2::Sha256::new();
    h.update(&big);
    h.update(format!("{name}\n").as_bytes());
    let sum = data_encoding::HEXLOWER.encode(&h.finalize());
    (path, sum, blake3::hash(&big).to_hex().to_string())
}

/// Every blob file in the host cache holds exactly the bytes its name is
/// the digest of: nothing was kept that was not verified.
fn cache_blobs_verify(cache: &Path) -> usize {
    let mut n = 0;
    let mut dirs = vec![cache.join("blobs")];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(
                blake3::hash(&bytes).to_hex().to_string(),
                name,
                "the host cache keeps a blob that is not what its name says: {}",
                p.display()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn a_guest_reads_on_through_faults_in_the_bucket_and_the_store_daemons() {
    require_vm_tools();
    let tmp = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(tmp.path()).unwrap();
    let mut garage = Garage::start();
    for (k, v) in garage.env() {
        std::env::set_var(k, v);
    }
    let bucket = |node: usize| {
        format!(
            "s3://{}/fleet?endpoint={}&region=garage",
            garage.bucket(),
            garage.endpoint(node)
        )
    };

    // In through a writable daemon (node 2's endpoint).
    let (writer, w_addr) = Proc::daemon(&bucket(2), &["--writable"], root.join("w.log"));
    let app = fixture_app();
    let closure = closure_of(&[&app]);
    let numbers = fixture_data(&closure);
    let host_sum = host_digest(&closure);
    let mut args = vec!["--store", w_addr.as_str(), "copy"];
    args.extend(closure.iter().map(String::as_str));
    let t = Instant::now();
    cli_ok(&args);
    eprintln!(
        "copy of the closure through a daemon into the bucket: {:?}",
        t.elapsed()
    );
    let paths: Vec<(String, String, String)> = (1..=7)
        // odd seeds: pseudo_random(_, s) is the same for s and s | 1
        .map(|i| store_path(&root, &w_addr, &format!("p{i}"), 2 * i + 1))
        .collect();
    drop(writer);

    // Bad input from the bucket, behind the store's back: other bytes of
    // the same length, cut short, gone.
    let key = |blake: &str| format!("fleet/blobs/{blake}");
    let (st, _) = garage.s3(0, "PUT", &key(&paths[4].2), &pseudo_random(600_000, 99));
    // (p6's own bytes, cut short)
    assert_eq!(st, 200, "overwriting a blob");
    let (st, _) = garage.s3(
        0,
        "PUT",
        &key(&paths[5].2),
        &pseudo_random(600_000, 13)[..1000],
    );
    assert_eq!(st, 200, "truncating a blob");
    let (st, _) = garage.s3(0, "DELETE", &key(&paths[6].2), b"");
    assert!(st == 204 || st == 200, "deleting a blob: {st}");

    // Two read-only daemons over the bucket, through nodes 0 and 1.
    // Store timeouts above Garage's RPC timeout here (15 s, the harness's):
    // with a node frozen, some of Garage's own requests wait that long.
    let ro = ["--read-only", "--store-timeout", "20"];
    let (mut da, a_addr) = Proc::daemon(&bucket(0), &ro, root.join("a.log"));
    let (db, b_addr) = Proc::daemon(&bucket(1), &ro, root.join("b.log"));
    let cache = root.join("cache");
    let run = root.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let sock = run.join("daemon.sock");
    let list = format!("{a_addr},{b_addr}");
    let host = Proc::spawn(
        &[
            "--store",
            &list,
            "--cache-dir",
            cache.to_str().unwrap(),
            "daemon",
            "--read-only",
            // the faults must meet the guest's own reads, not a prefetch
            "--prefetch",
            "none",
            "--store-timeout",
            "45",
            "--listen",
            &format!("unix:{}", sock.display()),
        ],
        root.join("host.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "host daemon: {}",
            read_log(&host.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let vsock = root.join("vm.sock");
    let vm_log = root.join("vm.log");
    let mut vm_daemon = Proc::spawn(
        &[
            "--store",
            &format!("grpc+unix://{}", sock.display()),
            "--cache-dir",
            cache.to_str().unwrap(),
            "virtiofs",
            "--tag",
            "nix-store",
            "--store-timeout",
            "90",
            "--socket-path",
            vsock.to_str().unwrap(),
        ],
        vm_log.clone(),
    );

    let p = |i: usize| paths[i - 1].0.as_str();
    let guest = format!(
        r#"set -u
{DIGEST_SCRIPT}
echo "APP: $({app}/bin/app)"
printf '%s' "$(digest {closure})" | sha256sum | sed 's/^/SUM: /'
phase() {{ echo "PHASE $1"; sleep 4; }}
sum() {{ cat $1/big $1/small | sha256sum | cut -d' ' -f1; }}
fails() {{ if out=$(cat $1/big 2>&1 >/dev/null); then echo "read"; else echo "failed: $out"; fi; }}
phase node-killed
echo "P1: $(sum {p1})"
phase node-back
sleep 15
phase node-frozen
echo "P2: $(sum {p2})"
phase two-down
echo "P3 DOWN: $(fails {p3})"
phase restarted
i=0; while [ $i -lt 20 ]; do s=$(sum {p3} 2>/dev/null) && [ -n "$s" ] && break; i=$((i+1)); sleep 3; done
echo "P3: $s (after $i retries)"
phase daemon-killed
echo "P4: $(sum {p4})"
echo "P5: $(fails {p5})"
echo "P6: $(fails {p6})"
echo "P7: $(fails {p7})"
exit 7
"#,
        closure = closure.join(" "),
        p1 = p(1),
        p2 = p(2),
        p3 = p(3),
        p4 = p(4),
        p5 = p(5),
        p6 = p(6),
        p7 = p(7),
    );
    let mut act = |line: &str| {
        let Some(phase) = line.trim().strip_prefix("PHASE ") else {
            return;
        };
        eprintln!("test: {phase}");
        match phase {
            "node-killed" => garage.kill(2),
            // Back in every node's view: a node that has not seen it
            // return waits for the frozen one instead (30 s, Garage's).
            "node-back" => {
                garage.restart(2);
                (0..3).for_each(|n| garage.wait_health(n, true));
            }
            "node-frozen" => garage.stop(1),
            "two-down" => {
                garage.cont(1);
                garage.kill(1);
                garage.kill(2);
            }
            "restarted" => {
                garage.restart(1);
                garage.restart(2);
                (0..3).for_each(|n| garage.wait_health(n, true));
            }
            "daemon-killed" => da.kill(),
            _ => {}
        }
    };
    let t = Instant::now();
    let (status, console) = run_vm(
        None,
        &vsock,
        &guest,
        &root,
        VmOpts {
            timeout_secs: 900,
            on_line: Some(&mut act),
            ..VmOpts::default()
        },
    );
    eprintln!("guest done in {:?}", t.elapsed());
    let logs = || {
        format!(
            "per-VM: {}\nhost: {}\nA: {}\nB: {}",
            read_log(&vm_log),
            read_log(&host.log),
            read_log(&da.log),
            read_log(&db.log)
        )
    };
    assert_eq!(status, 7, "{}", logs());
    assert_eq!(
        line_after(&console, "APP: "),
        format!("20000 {numbers}/share/numbers")
    );
    assert_eq!(
        line_after(&console, "SUM: ").split_whitespace().next(),
        Some(host_sum.as_str()),
        "the closure read through the bucket differs from /nix/store"
    );
    assert_eq!(
        line_after(&console, "P1: "),
        paths[0].1,
        "one node killed: {}",
        logs()
    );
    assert_eq!(
        line_after(&console, "P2: "),
        paths[1].1,
        "one node frozen: {}",
        logs()
    );
    let down = line_after(&console, "P3 DOWN: ");
    assert!(
        down.starts_with("failed:")
            && (down.contains("Input/output error") || down.contains("timed out")),
        "two of three nodes down: {down}\n{}",
        logs()
    );
    assert!(
        line_after(&console, "P3: ").starts_with(&paths[2].1),
        "after the restart: {}\n{}",
        line_after(&console, "P3: "),
        logs()
    );
    assert_eq!(
        line_after(&console, "P4: "),
        paths[3].1,
        "one store daemon killed: {}",
        logs()
    );
    for (i, what) in [(5, "other bytes"), (6, "cut short"), (7, "missing")] {
        let got = line_after(&console, &format!("P{i}: "));
        assert!(
            got.starts_with("failed:") && got.contains("Input/output error"),
            "a blob with {what} in the bucket: {got}\n{}",
            logs()
        );
    }
    let daemons = format!("{}{}", read_log(&da.log), read_log(&db.log));
    assert!(
        daemons.contains(&format!(
            "the bucket holds other bytes under blob b3:{}",
            data_encoding::BASE64.encode(
                &data_encoding::HEXLOWER
                    .decode(paths[4].2.as_bytes())
                    .unwrap()
            )
        )),
        "no digest mismatch logged for the overwritten blob: {}",
        logs()
    );
    let verified = cache_blobs_verify(&cache);
    assert!(verified > 0, "the host cache holds no blob");
    for (_, _, blake) in &paths[4..] {
        assert!(
            !cache.join("blobs").join(&blake[..2]).join(blake).exists(),
            "the host cache kept a bad blob {blake}"
        );
    }
    let st = wait_exit(&mut vm_daemon.child, Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "per-VM daemon: {}", logs());
}
