//! The serving process's system call allowlist. The policy is a
//! seccompiler JSON file under `seccomp/`, compiled into the binary and
//! installed on every thread (TSYNC) once setup is done; `--seccomp`
//! chooses what a call outside it does.
use seccompiler::{BpfProgram, TargetArch};

/// The policy for the architecture this binary was built for.
#[cfg(target_arch = "x86_64")]
const POLICY: Option<&str> = Some(include_str!("../../seccomp/x86_64.json"));
#[cfg(not(target_arch = "x86_64"))]
const POLICY: Option<&str> = None;

/// The filter's name inside the policy file.
const FILTER: &str = "serving";
/// A second filter, installed beside it: calls answered ENOSYS (clone3,
/// whose flags a filter cannot see, so the C library falls back to clone).
const ENOSYS_FILTER: &str = "enosys";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompAction {
    /// Kill the whole process (default).
    Kill,
    /// Allow the call, but log it (kernel audit log / dmesg).
    Log,
    /// Send SIGSYS to the calling thread.
    Trap,
    /// No filter: for debugging only.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("no seccomp policy for {0}: use --seccomp none")]
    NoPolicy(&'static str),
    #[error("seccomp policy: {0}")]
    Policy(String),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
}

/// Compiles the built-in policy with `action` for calls outside it: the
/// serving filter, then the ENOSYS one (the kernel applies the strictest
/// answer of all installed filters, and ERRNO beats ALLOW).
pub fn compile(action: SeccompAction) -> Result<Option<[BpfProgram; 2]>, SeccompError> {
    let mismatch = match action {
        SeccompAction::None => return Ok(None),
        SeccompAction::Kill => "kill_process",
        SeccompAction::Log => "log",
        SeccompAction::Trap => "trap",
    };
    let text = POLICY.ok_or(SeccompError::NoPolicy(std::env::consts::ARCH))?;
    let bad = |e: &dyn std::fmt::Display| SeccompError::Policy(e.to_string());
    let mut json: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e))?;
    let filter = json
        .get_mut(FILTER)
        .and_then(|f| f.as_object_mut())
        .ok_or_else(|| bad(&format!("no {FILTER:?} filter")))?;
    filter.insert("mismatch_action".into(), mismatch.into());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(&e))?;
    let bytes = serde_json::to_vec(&json).map_err(|e| bad(&e))?;
    let mut map = seccompiler::compile_from_json(bytes.as_slice(), arch).map_err(|e| bad(&e))?;
    let mut take = |name: &str| {
        map.remove(name)
            .ok_or_else(|| bad(&format!("no {name:?} filter")))
    };
    Ok(Some([take(FILTER)?, take(ENOSYS_FILTER)?]))
}

/// Installs the filter on every thread of the process (it also sets
/// no_new_privs, which the kernel requires of an unprivileged caller).
pub fn install(action: SeccompAction) -> Result<(), SeccompError> {
    let Some(progs) = compile(action)? else {
        tracing::warn!("--seccomp none: serving without a system call filter");
        return Ok(());
    };
    // The ENOSYS filter first: the serving one forbids seccomp(2) itself.
    for prog in progs.iter().rev() {
        seccompiler::apply_filter_all_threads(prog).map_err(SeccompError::Install)?;
    }
    tracing::debug!(
        "seccomp filter installed ({} instructions, {action:?} on a violation)",
        progs[0].len()
    );
    Ok(())
}

/// Makes a call the policy forbids (`--selftest-seccomp`): with the
/// default action the process dies here.
pub fn selftest() {
    // clone3 with no arguments: EFAULT/EINVAL if it reached the kernel,
    // ENOSYS from the filter.
    // SAFETY: a null argument block and size 0; no memory is touched.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    let errno = std::io::Error::last_os_error();
    tracing::warn!("seccomp selftest: clone3 returned {rc} ({errno})");
    // personality(0xffffffff) only queries the persona: harmless if allowed.
    // SAFETY: integer argument only, no memory effects.
    let rc = unsafe { libc::personality(0xffff_ffff) };
    tracing::warn!("seccomp selftest: personality() was allowed (returned {rc})");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles_for_every_action() {
        for a in [SeccompAction::Kill, SeccompAction::Log, SeccompAction::Trap] {
            let [prog, enosys] = compile(a).unwrap().unwrap();
            assert!(prog.len() > 40, "{a:?}: {} instructions", prog.len());
            assert!(enosys.len() < 12, "{a:?}: {} instructions", enosys.len());
        }
        assert!(compile(SeccompAction::None).unwrap().is_none());
    }

    #[test]
    fn policy_forbids_what_a_read_only_server_never_needs() {
        let json: serde_json::Value = serde_json::from_str(POLICY.unwrap()).unwrap();
        let names: Vec<&str> = json[FILTER]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .collect();
        for forbidden in [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "personality",
            "init_module",
            "bpf",
            "kexec_load",
            "setuid",
            "capset",
            "process_vm_writev",
            "keyctl",
            "unlink",
            "unlinkat",
            "rename",
            "renameat2",
            "mkdirat",
        ] {
            assert!(!names.contains(&forbidden), "{forbidden} is allowed");
        }
        // seccompiler ORs the rules of one syscall, and a rule without
        // arguments among rules with arguments is silently dropped
        let rules = json[FILTER]["filter"].as_array().unwrap();
        for r in rules.iter().filter(|r| r.get("args").is_none()) {
            let n = r["syscall"].as_str().unwrap();
            assert_eq!(
                names.iter().filter(|&&m| m == n).count(),
                1,
                "{n} listed twice"
            );
        }
    }
}
