//! Deployment artefacts: the container's COPY sources exist, every
//! Kubernetes ConfigMap's config passes `check-config`.

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
