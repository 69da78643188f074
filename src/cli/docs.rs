//! `completions` and `man`: shell completions and manual pages made from
//! the same clap definitions as `--help`, so they cannot drift from it.
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// Shell to complete for: bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Directory to write tvix-virtiofsd.1 and one page per command into.
    pub dir: PathBuf,
}

/// Writes the completion script of `cmd` (the whole command line) to
/// stdout.
pub fn completions(args: CompletionsArgs, mut cmd: clap::Command) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "tvix-virtiofsd", &mut out);
    if args.shell == clap_complete::Shell::Bash {
        // clap_complete 4.6 names the bash cases of a hyphenated binary's
        // subcommands `tvix__subcmd__virtiofsd__...` but sets `cmd` to
        // `tvix__virtiofsd__...`, so no subcommand's flags complete.
        out = String::from_utf8_lossy(&out)
            .replace("tvix__subcmd__virtiofsd", "tvix__virtiofsd")
            .into_bytes();
    }
    std::io::stdout().write_all(&out)?;
    Ok(())
}

/// Writes the manual pages into `dir` (made if missing) and lists them.
pub fn man(args: ManArgs, cmd: clap::Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    clap_mangen::generate_to(cmd, &args.dir)
        .with_context(|| format!("writing manual pages into {}", args.dir.display()))?;
    let mut pages: Vec<_> = std::fs::read_dir(&args.dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    let mut out = std::io::stdout().lock();
    for p in pages {
        writeln!(out, "{}", p.display())?;
    }
    Ok(())
}
