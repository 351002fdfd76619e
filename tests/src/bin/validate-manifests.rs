//! `validate-manifests [--crds FILE] PATH…`: validates every YAML document of the given
//! files (or of every *.yaml under a given directory) strictly — Kubernetes objects
//! through k8s-openapi, Istio objects against the CRD schemas of FILE (default: Istio
//! 1.27.9's, at ../shared/istio-1.27.9/crd-all.gen.yaml beside the repository). Exit 0
//! when all are valid, 1 with one line per problem otherwise, 64 on bad usage.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use tokensmith_tests::{manifests, process::workspace_root};

fn yaml_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for entry in entries {
            yaml_files(&entry, out)?;
        }
    } else if matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    ) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut crds = workspace_root().join("../shared/istio-1.27.9/crd-all.gen.yaml");
    if args.peek().map(String::as_str) == Some("--crds") {
        args.next();
        match args.next() {
            Some(path) => crds = PathBuf::from(path),
            None => {
                eprintln!("usage: validate-manifests [--crds FILE] PATH...");
                return ExitCode::from(64);
            }
        }
    }
    let paths: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if paths.is_empty() {
        eprintln!("usage: validate-manifests [--crds FILE] PATH...");
        return ExitCode::from(64);
    }
    let schemas = match manifests::CrdSchemas::load(&crds) {
        Ok(schemas) => schemas,
        Err(e) => {
            eprintln!("validate-manifests: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut files = Vec::new();
    for path in &paths {
        if let Err(e) = yaml_files(path, &mut files) {
            eprintln!("validate-manifests: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let mut bad = 0;
    for file in &files {
        let result = std::fs::read_to_string(file)
            .map_err(|e| tokensmith_tests::Error::Manifest(e.to_string()))
            .and_then(|text| manifests::validate_all(&text, &schemas));
        match result {
            Ok(problems) => {
                for (document, problems) in problems {
                    bad += 1;
                    println!("{}: {document}: {problems}", file.display());
                }
            }
            Err(e) => {
                bad += 1;
                println!("{}: {e}", file.display());
            }
        }
    }
    if bad == 0 {
        println!("validate-manifests: {} files valid", files.len());
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
