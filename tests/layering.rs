//! The crate's layers, checked from its source: `src/lib.rs` lists them in
//! the order data flows (host at the bottom edge, cli at the top), and no
//! file may import from a layer listed after its own. Inside a layer, the
//! units (its files and folders) may not import each other in a circle,
//! and no store backend may lean on the host cache.
//!
//! Read from the text of `src/`: every `use` and every `crate::`/`super::`
//! path outside comments, strings and `#[cfg(test)]` modules, resolved
//! through the `pub use` re-exports of the module it names. Run it alone
//! with `cargo test --test layering`; it prints every arrow it refuses.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A module path from the crate root, e.g. `["store", "cache", "blob"]`.
type ModPath = Vec<String>;
/// A unit of a layer: (layer, file or folder right under it).
type Unit = (String, String);

/// One source file: its module path, its code (comments, strings and test
/// modules blanked out) and the child modules it declares.
struct Source {
    file: PathBuf,
    module: ModPath,
    code: String,
    children: Vec<String>,
}

/// Blanks out comments, string and char literals, keeping line breaks so
/// that what is reported can be found.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |s: &[u8], out: &mut String| {
        for &c in s {
            out.push(if c == b'\n' { '\n' } else { ' ' });
        }
    };
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&rest[..j], &mut out);
            i += j;
        } else if rest[0] == b'r'
            && (rest.starts_with(b"r\"") || rest.starts_with(b"r#"))
            && (i == 0 || !is_ident(b[i - 1]))
        {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let start = 2 + hashes;
            let end = rest[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| start + p + close.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&rest[..end], &mut out);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('a', '\n', '\u{..}'), not a lifetime ('a).
            let lit = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|&c| c == b'\'').map(|p| p + 3)
            } else if rest.get(2) == Some(&b'\'') {
                Some(3)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(6)])
                    .ok()
                    .and_then(|s| s.chars().next());
                ch.filter(|c| !c.is_ascii())
                    .map(|c| 1 + c.len_utf8())
                    .filter(|&n| rest.get(n) == Some(&b'\''))
                    .map(|n| n + 1)
            };
            let n = lit.unwrap_or(1);
            blank(&rest[..n], &mut out);
            if n == 1 {
                out.pop();
                out.push('\'');
            }
            i += n;
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Blanks the body of every `#[cfg(test)]` item (a test module inline).
fn drop_test_items(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(p) = out[from..].find("#[cfg(test)]") {
        let at = from + p;
        let Some(open) = out[at..].find(['{', ';']).map(|o| at + o) else {
            break;
        };
        if out.as_bytes()[open] == b';' {
            from = open;
            continue;
        }
        let mut depth = 0;
        let mut end = out.len();
        for (j, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        let blanked: String = out[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(at..end, &blanked);
        from = end;
    }
    out
}

/// Child modules declared with `mod x;` or `mod x {`, and those declared
/// under `#[cfg(test)]` (whose files are test code).
fn declared(code: &str, raw: &str) -> (Vec<String>, Vec<String>) {
    let mut mods = Vec::new();
    for line in code.lines() {
        let t = line.trim_start();
        let t = t
            .strip_prefix("pub(crate) ")
            .or_else(|| t.strip_prefix("pub "))
            .unwrap_or(t);
        if let Some(rest) = t.strip_prefix("mod ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                mods.push(name);
            }
        }
    }
    let mut tests = Vec::new();
    let lines: Vec<&str> = raw.lines().map(str::trim).collect();
    for w in lines.windows(2) {
        if w[0] == "#[cfg(test)]" {
            if let Some(rest) = w[1].strip_prefix("mod ") {
                if let Some(name) = rest.strip_suffix(';') {
                    tests.push(name.to_string());
                }
            }
        }
    }
    (mods, tests)
}

fn load(root: &Path) -> Vec<Source> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = root.join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files.sort();
    let mut sources = Vec::new();
    let mut test_files = BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel == Path::new("main.rs") {
            continue;
        }
        let mut module: ModPath = rel
            .with_extension("")
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|l| l == "mod" || l == "lib") {
            module.pop();
        }
        let raw = std::fs::read_to_string(&file).unwrap();
        let code = drop_test_items(&strip(&raw));
        let (children, tests) = declared(&code, &raw);
        for t in tests {
            let mut m = module.clone();
            m.push(t);
            test_files.insert(m);
        }
        sources.push(Source {
            file: rel.to_path_buf(),
            module,
            code,
            children,
        });
    }
    // Test-only files and the fuzzing module are not the product.
    sources.retain(|s| {
        !(1..=s.module.len()).any(|n| test_files.contains(&s.module[..n]))
            && s.module.first().is_none_or(|m| m != "fuzz")
    });
    sources
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn parse(s: &[char], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        let mut seg = String::new();
        while *i < s.len() {
            let c = s[*i];
            match c {
                '{' => {
                    *i += 1;
                    loop {
                        parse(s, i, &path, out);
                        if *i >= s.len() || s[*i] == '}' {
                            *i += 1;
                            break;
                        }
                        *i += 1; // ','
                    }
                    return;
                }
                ',' | '}' => break,
                ':' => {
                    if !seg.is_empty() {
                        path.push(std::mem::take(&mut seg));
                    }
                    *i += 1;
                }
                c if c.is_whitespace() => *i += 1,
                _ => {
                    seg.push(c);
                    *i += 1;
                }
            }
        }
        if !seg.is_empty() {
            let name = seg.split(" as ").next().unwrap_or(&seg).to_string();
            path.push(name.split_whitespace().next().unwrap_or("").to_string());
        }
        if path.len() > prefix.len() || !path.is_empty() {
            out.push(path);
        }
    }
    // Keep " as " readable: it is the only place a space matters.
    let chars: Vec<char> = tree.replace(" as ", "\u{1}").chars().collect();
    let chars: Vec<char> = chars
        .into_iter()
        .map(|c| if c == '\u{1}' { '~' } else { c })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    parse(&chars, &mut i, &[], &mut out);
    for p in &mut out {
        if let Some(last) = p.last_mut() {
            if let Some(k) = last.find('~') {
                last.truncate(k);
            }
        }
    }
    out
}

/// Every path the code names: `use` trees (marked re-export when `pub`)
/// and inline paths that start at `crate`, `super`, `self` or a child.
fn paths_in(src: &Source) -> Vec<(Vec<String>, bool)> {
    let code = &src.code;
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut in_use = vec![false; b.len()];
    // use statements
    let mut k = 0;
    while let Some(p) = code[k..].find("use ") {
        let at = k + p;
        k = at + 4;
        if at > 0 && is_ident(b[at - 1]) {
            continue;
        }
        let Some(end) = code[at..].find(';').map(|e| at + e) else {
            break;
        };
        let before = code[..at].trim_end();
        let public = before.ends_with("pub") || before.ends_with("pub(crate)");
        for flag in &mut in_use[at..end] {
            *flag = true;
        }
        for path in expand(&code[at + 4..end]) {
            out.push((path, public));
        }
        k = end;
    }
    // inline paths
    let starts: Vec<&str> = ["crate", "super", "self"]
        .into_iter()
        .chain(src.children.iter().map(String::as_str))
        .collect();
    let mut i = 0;
    while i < b.len() {
        if in_use[i] || !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let len = b[i..].iter().take_while(|&&c| is_ident(c)).count();
        let word = &code[i..i + len];
        if starts.contains(&word) && code[i + len..].starts_with("::") {
            let mut j = i;
            let mut path = Vec::new();
            loop {
                let n = b[j..].iter().take_while(|&&c| is_ident(c)).count();
                if n == 0 {
                    break;
                }
                path.push(code[j..j + n].to_string());
                j += n;
                if code[j..].starts_with("::") {
                    j += 2;
                } else {
                    break;
                }
            }
            out.push((path, false));
            i = j;
        } else {
            i += len.max(1);
        }
    }
    out
}

/// A path made absolute from the module it is written in.
fn absolute(path: &[String], here: &ModPath, children: &[String]) -> Option<ModPath> {
    let mut abs = here.clone();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            abs.clear();
            rest = &path[1..];
        }
        Some("self") => rest = &path[1..],
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                abs.pop()?;
                rest = &rest[1..];
            }
        }
        Some(first) if children.iter().any(|c| c == first) => {}
        _ => return None, // another crate, std, or a local name
    }
    abs.extend(rest.iter().cloned());
    Some(abs)
}

/// The module a path lands in, following re-exports (`pub use x::Name`).
fn resolve(
    path: &ModPath,
    modules: &BTreeSet<ModPath>,
    reexports: &HashMap<(ModPath, String), ModPath>,
) -> ModPath {
    let mut depth = 0;
    while depth < path.len() && modules.contains(&path[..=depth].to_vec()) {
        depth += 1;
    }
    let module = path[..depth].to_vec();
    if let Some(name) = path.get(depth) {
        if let Some(target) = reexports.get(&(module.clone(), name.clone())) {
            if target != path {
                return resolve(target, modules, reexports);
            }
        }
    }
    module
}

/// Where a module belongs: its layer and, inside it, its unit (the file or
/// folder right under the layer; empty for the layer's own `mod.rs`).
fn unit(m: &ModPath) -> (String, String) {
    (
        m.first().cloned().unwrap_or_default(),
        m.get(1).cloned().unwrap_or_default(),
    )
}

/// The layers in the order `src/lib.rs` declares them.
fn layers(root: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let code = drop_test_items(&strip(&lib));
    let mut out = Vec::new();
    let mut gated = false;
    for line in code.lines().map(str::trim) {
        if line.starts_with("#[cfg(") {
            gated = true;
        } else if let Some(name) = line
            .strip_prefix("pub mod ")
            .and_then(|r| r.strip_suffix(';'))
        {
            if !gated {
                out.push(name.to_string());
            }
            gated = false;
        }
    }
    out
}

/// Every arrow between units of different files: (from, to, where).
fn arrows(root: &Path) -> Vec<(ModPath, ModPath, String)> {
    let sources = load(root);
    let modules: BTreeSet<ModPath> = sources.iter().map(|s| s.module.clone()).collect();
    let mut reexports = HashMap::new();
    let mut uses = Vec::new();
    for s in &sources {
        for (path, public) in paths_in(s) {
            let Some(abs) = absolute(&path, &s.module, &s.children) else {
                continue;
            };
            if public {
                if let Some(name) = abs.last() {
                    reexports.insert((s.module.clone(), name.clone()), abs.clone());
                }
            } else {
                uses.push((s, abs, path.join("::")));
            }
        }
    }
    let mut out = Vec::new();
    for (s, abs, written) in uses {
        let target = resolve(&abs, &modules, &reexports);
        if target.is_empty() || target == s.module {
            continue;
        }
        out.push((
            s.module.clone(),
            target,
            format!("{}: {written}", s.file.display()),
        ));
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_crate_root_lists_a_handful_of_layers() {
    let layers = layers(&root());
    assert!(
        (5..=12).contains(&layers.len()),
        "src/lib.rs should list a handful of layers, lists {layers:?}"
    );
    for l in &layers {
        assert!(
            root().join("src").join(l).join("mod.rs").is_file(),
            "layer {l} is not a folder with a mod.rs"
        );
    }
}

#[test]
fn no_layer_imports_one_listed_after_it() {
    let order = layers(&root());
    let rank = |m: &ModPath| m.first().and_then(|l| order.iter().position(|o| o == l));
    let mut up = Vec::new();
    for (from, to, at) in arrows(&root()) {
        if let (Some(a), Some(b)) = (rank(&from), rank(&to)) {
            if b > a {
                up.push(format!("{at}  ({} -> {})", from.join("::"), to.join("::")));
            }
        }
    }
    up.sort();
    up.dedup();
    assert!(
        up.is_empty(),
        "imports that run up a layer:\n{}",
        up.join("\n")
    );
}

#[test]
fn no_store_backend_imports_the_host_cache() {
    let backends = ["blob", "directory", "pathinfo", "disk"];
    let mut bad = Vec::new();
    for (from, to, at) in arrows(&root()) {
        let backend = from.first().is_some_and(|l| l == "store")
            && from.get(1).is_some_and(|u| backends.contains(&u.as_str()));
        if backend && to.starts_with(&["store".to_string(), "cache".to_string()]) {
            bad.push(at);
        }
    }
    assert!(
        bad.is_empty(),
        "backends that import the cache:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_units_import_each_other_in_a_circle() {
    // Units inside one layer: its files and folders, and its own mod.rs.
    let mut graph: BTreeMap<Unit, BTreeSet<Unit>> = BTreeMap::new();
    let mut seen_at: HashMap<(Unit, Unit), String> = HashMap::new();
    for (from, to, at) in arrows(&root()) {
        let (a, b) = (unit(&from), unit(&to));
        if a != b && a.0 == b.0 {
            graph.entry(a.clone()).or_default().insert(b.clone());
            seen_at.entry((a, b)).or_insert(at);
        }
    }
    // Tarjan's strongly connected components, iteratively small enough to
    // recurse: a layer has tens of units.
    struct T<'a> {
        g: &'a BTreeMap<(String, String), BTreeSet<(String, String)>>,
        index: HashMap<(String, String), usize>,
        low: HashMap<(String, String), usize>,
        stack: Vec<(String, String)>,
        on: BTreeSet<(String, String)>,
        next: usize,
        out: Vec<Vec<(String, String)>>,
    }
    fn visit(t: &mut T, v: (String, String)) {
        t.index.insert(v.clone(), t.next);
        t.low.insert(v.clone(), t.next);
        t.next += 1;
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        let succ: Vec<_> =
            t.g.get(&v)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
        for w in succ {
            if !t.index.contains_key(&w) {
                visit(t, w.clone());
                let l = t.low[&v].min(t.low[&w]);
                t.low.insert(v.clone(), l);
            } else if t.on.contains(&w) {
                let l = t.low[&v].min(t.index[&w]);
                t.low.insert(v.clone(), l);
            }
        }
        if t.low[&v] == t.index[&v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(&w);
                let done = w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g: &graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    let nodes: Vec<_> = graph.keys().cloned().collect();
    for v in nodes {
        if !t.index.contains_key(&v) {
            visit(&mut t, v);
        }
    }
    let name = |u: &(String, String)| {
        if u.1.is_empty() {
            format!("{} (its mod.rs)", u.0)
        } else {
            format!("{}::{}", u.0, u.1)
        }
    };
    let mut report = Vec::new();
    for comp in &t.out {
        report.push(format!(
            "circle: {}",
            comp.iter().map(name).collect::<Vec<_>>().join(", ")
        ));
        for a in comp {
            for b in comp {
                if let Some(at) = seen_at.get(&(a.clone(), b.clone())) {
                    report.push(format!("  {} -> {}  at {at}", name(a), name(b)));
                }
            }
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn the_checker_sees_what_it_must() {
    // The reader finds paths in use trees, inline paths and re-exports,
    // and ignores comments and strings: if it did not, the checks above
    // would pass on anything.
    let code = strip(
        "use crate::a::{b::C, d};\n// use crate::z::Y;\nlet s = \"crate::q::R\";\nlet x = super::e::F;\n",
    );
    let s = Source {
        file: PathBuf::from("x.rs"),
        module: vec!["m".into(), "n".into()],
        code,
        children: vec![],
    };
    let found: Vec<String> = paths_in(&s)
        .into_iter()
        .map(|(p, _)| p.join("::"))
        .collect();
    assert_eq!(found, ["crate::a::b::C", "crate::a::d", "super::e::F"]);
    let arrows = arrows(&root());
    assert!(
        arrows
            .iter()
            .any(|(from, to, _)| from.first().is_some_and(|l| l == "cli")
                && to.first().is_some_and(|l| l == "store")),
        "the commands open stores: an arrow cli -> store must be seen"
    );
}
