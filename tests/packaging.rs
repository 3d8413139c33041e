//! Deployment artefacts: the container's COPY sources exist and make a
//! build context cargo can build from, every Kubernetes ConfigMap's config
//! passes `check-config`, the host name survives the systemd unit's `/proc`.

mod common;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn dockerfile_copies_only_paths_that_exist() {
    let text = std::fs::read_to_string(format!("{ROOT}/packaging/container/Dockerfile")).unwrap();
    let mut checked = 0;
    for line in text.lines().map(str::trim).filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        for src in &parts[..parts.len() - 1] {
            let p = std::path::Path::new(ROOT).join(src);
            assert!(
                p.exists(),
                "the Dockerfile copies {src}, which does not exist (build context: the repository root)"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "found only {checked} COPY sources");
}

/// The build stage's COPY lines, put together as `docker build` would (in
/// its WORKDIR), make a tree whose manifest cargo can read and whose
/// dependencies it finds in the lock file: a file the manifest names but
/// the image leaves out fails `cargo build` before it compiles anything.
#[test]
fn the_container_build_context_is_enough_for_cargo() {
    let text = std::fs::read_to_string(format!("{ROOT}/packaging/container/Dockerfile")).unwrap();
    let build_stage = text.split("\nFROM ").nth(1).expect("a build stage");
    let ctx = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for line in build_stage.lines().map(str::trim).filter(|l| l.starts_with("COPY ")) {
        let parts: Vec<&str> = line.split_whitespace().skip(1).collect();
        let (dest, srcs) = parts.split_last().unwrap();
        for src in srcs {
            let from = std::path::Path::new(ROOT).join(src);
            let to = if dest.ends_with('/') { ctx.path().join(dest).join(src) } else { ctx.path().join(dest) };
            copy_tree(&from, &to);
            copied += 1;
        }
    }
    assert!(copied >= 4, "found only {copied} COPY sources in the build stage");
    let rustc = std::process::Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap();
    let manifest = ctx.path().join("Cargo.toml");
    let o = std::process::Command::new(env!("CARGO"))
        .args(["fetch", "--offline", "--locked", "--target", &host, "--manifest-path"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cargo cannot build from the image's build context: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// The `config.toml: |` blocks of a manifest.
fn embedded_configs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("config.toml: |") {
            let indent = l.len() - l.trim_start().len();
            let mut block = String::new();
            for b in &lines[i + 1..] {
                let bi = b.len() - b.trim_start().len();
                if !b.trim().is_empty() && bi <= indent {
                    break;
                }
                block.push_str(b.get(indent + 2..).unwrap_or(""));
                block.push('\n');
            }
            out.push(block);
        }
    }
    out
}

#[tokio::test]
async fn kubernetes_configmaps_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "x\n").unwrap();
    let mut found = 0;
    for entry in std::fs::read_dir(format!("{ROOT}/packaging/kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        let yaml = std::fs::read_to_string(&path).unwrap();
        for (i, cfg) in embedded_configs(&yaml).into_iter().enumerate() {
            let p = dir.path().join(format!("{}-{i}.toml", path.file_stem().unwrap().to_string_lossy()));
            std::fs::write(&p, cfg).unwrap();
            // The token file is mounted from a Secret in the cluster; point it at a stand-in here.
            let o = run_bin(
                &["check-config", "--config", p.to_str().unwrap()],
                &[("OPSERA_SHIPPER__API__TOKEN_FILE", token.to_str().unwrap())],
            )
            .await;
            assert_eq!(o.status.code(), Some(0), "{}: {}", path.display(), stderr(&o));
            found += 1;
        }
    }
    assert!(found >= 1, "no ConfigMap with a config.toml found");
}

/// The systemd unit mounts a `/proc` that holds only processes
/// (`ProcSubset=pid`): no `/proc/sys/kernel/hostname`. Syslog messages must
/// still carry this host's name, not `localhost`. Run the same way here,
/// in a mount namespace of its own (needs root; skipped where the mount is
/// not allowed).
#[test]
fn the_host_name_survives_the_units_proc_subset() {
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/opsera-shipper.service")).unwrap();
    assert!(unit.lines().any(|l| l.trim() == "ProcSubset=pid"), "the unit no longer hides /proc: drop this test");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let state = dir.path().join("state.db");
    std::fs::write(
        &cfg,
        format!("[api]\ntoken = \"x\"\n[state]\npath = {state:?}\n[sinks.sys]\ntype = \"syslog\"\naddress = \"127.0.0.1:514\"\n"),
    )
    .unwrap();
    let script = format!(
        "mount -t proc -o subset=pid proc /proc || exit 99; test ! -e /proc/sys/kernel/hostname || exit 98; exec {BIN} check-config --config {}",
        cfg.display()
    );
    let o =
        std::process::Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output();
    let o = match o {
        Ok(o) if o.status.code() != Some(99) && o.status.code() != Some(1) => o,
        other => {
            eprintln!("skipped: cannot mount a /proc of processes only here ({other:?})");
            return;
        }
    };
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("hostname={} ", host.trim())), "{out}");
}
