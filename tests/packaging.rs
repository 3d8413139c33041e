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

/// The image's own config (the file its final stage puts at the config path)
/// is valid, and its health check, `opsera-shipper health` with that config,
/// has ops endpoints to ask.
#[tokio::test]
async fn the_images_config_is_valid_and_its_health_check_has_endpoints_to_ask() {
    let text = std::fs::read_to_string(format!("{ROOT}/packaging/container/Dockerfile")).unwrap();
    let final_stage = text.rsplit("\nFROM ").next().unwrap();
    let src = final_stage
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter_map(|l| l.strip_suffix(" /etc/opsera-shipper/config.toml"))
        .next()
        .expect("the image ships a config");
    // The state volume's directory belongs to the image's user, so that a
    // named volume mounted there starts out writable by it.
    let user = final_stage.lines().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    let volume = final_stage.lines().find_map(|l| l.strip_prefix("VOLUME [\"")).expect("a VOLUME");
    let volume = volume.trim_end_matches("\"]");
    let staged = final_stage
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("COPY --from=build --chown={user} ")))
        .filter_map(|l| l.split_once(' '))
        .any(|(from, to)| from.ends_with(to) && from.starts_with("/staging/") && volume.starts_with(to));
    assert!(staged, "{volume} is not created owned by {user}: {final_stage}");
    let health = final_stage.lines().find(|l| l.starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    assert!(
        health.contains(r#""health", "--config", "/etc/opsera-shipper/config.toml""#),
        "the health check reads its address from the config: {health}"
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "x\n").unwrap();
    let o = run_bin(
        &["check-config", "--config", &format!("{ROOT}/{src}")],
        &[("OPSERA_SHIPPER__API__TOKEN_FILE", token.to_str().unwrap())],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("[server]\nlisten = "), "the health check has nothing to ask: {}", stdout(&o));
}

/// Beside an application, the shipper has no readiness probe: a pod is ready
/// only when every container is, and `/readyz` fails while Opsera's API is
/// down, which would take the application out of its Service.
#[test]
fn a_sidecar_never_gates_its_pods_readiness() {
    let yaml = std::fs::read_to_string(format!("{ROOT}/packaging/kubernetes/sidecar.yaml")).unwrap();
    let shipper = yaml.split("- name: opsera-shipper").nth(1).expect("the shipper's container");
    let shipper = shipper.split("\n        - name: ").next().unwrap().split("\n      volumes:").next().unwrap();
    assert!(shipper.contains("livenessProbe:"), "{shipper}");
    assert!(!shipper.contains("readinessProbe:"), "{shipper}");
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

/// The unit's service runs as a dynamic user, which cannot read root's
/// files. With the reference config as installed, done as systemd does it (each `LoadCredential=` copied into the
/// directory `%d` names, mode 0400 and owned by the service's user; then
/// `ExecStart=` run as that user, with `check-config` for `run`), the
/// service reads its config and the token from root's 0600 files. Needs
/// root, to be another user.
#[test]
fn the_units_service_user_reads_its_config_and_token() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let unit = std::fs::read_to_string(format!("{ROOT}/systemd/opsera-shipper.service")).unwrap();
    let setting = |key: &str| -> Vec<String> {
        unit.lines().filter_map(|l| l.trim().strip_prefix(key)).map(str::to_string).collect()
    };
    let nobody: u32 = 65534;
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let at = |p: &str| root.path().join(p);
    // Root's files, as the Debian package and the README install them: the
    // reference config unchanged, and the token beside it.
    std::fs::create_dir_all(at("etc/opsera-shipper")).unwrap();
    let config = std::fs::read_to_string(format!("{ROOT}/config/opsera-shipper.toml")).unwrap();
    for (name, text) in [("config.toml", config.as_str()), ("opsera-token", "t0k3n\n")] {
        let p = at(&format!("etc/opsera-shipper/{name}"));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // What systemd prepares: the credentials, and the binary at its path.
    std::fs::create_dir(at("creds")).unwrap();
    std::os::unix::fs::chown(at("creds"), Some(nobody), Some(nobody)).unwrap();
    let creds = setting("LoadCredential=");
    assert!(!creds.is_empty(), "the token is a credential");
    for c in &creds {
        let (id, source) = c.split_once(':').unwrap();
        let source = source.replace("/etc/opsera-shipper/", &at("etc/opsera-shipper/").display().to_string());
        let dest = at("creds").join(id);
        std::fs::copy(&source, &dest).unwrap();
        std::os::unix::fs::chown(&dest, Some(nobody), Some(nobody)).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    std::fs::copy(BIN, at("opsera-shipper")).unwrap();
    let exec = setting("ExecStart=").pop().unwrap();
    let exec = exec
        .replace("/usr/bin/opsera-shipper", &at("opsera-shipper").display().to_string())
        .replace("%d", &at("creds").display().to_string())
        .replace("/etc/opsera-shipper/", &at("etc/opsera-shipper/").display().to_string())
        .replace(" run ", " check-config ");
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(exec.split_whitespace())
        .env("CREDENTIALS_DIRECTORY", at("creds"))
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{exec}: {out}");
    let token = at("creds/opsera-token").display().to_string();
    assert!(out.contains(&token), "the token came from the credential {token}: {out}");
}
