//! The part of protoc's command line that prost-build uses (`-I`, `-o`, `--include_imports`,
//! `--include_source_info`, `--version`), implemented with the pure-Rust `protox` compiler.
//! It lets `etcd-client` build on machines without Debian's `protobuf-compiler`.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut includes = Vec::new();
    let mut output = None;
    let mut files = Vec::new();
    let mut include_imports = false;
    let mut include_source_info = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" => {
                println!("libprotoc 3.21.12");
                return ExitCode::SUCCESS;
            }
            "-I" | "--proto_path" => includes.extend(args.next().map(PathBuf::from)),
            "-o" | "--descriptor_set_out" => output = args.next().map(PathBuf::from),
            "--include_imports" => include_imports = true,
            "--include_source_info" => include_source_info = true,
            _ if arg.starts_with("-I") => includes.push(PathBuf::from(&arg[2..])),
            _ if arg.starts_with("--proto_path=") => {
                includes.push(PathBuf::from(&arg["--proto_path=".len()..]))
            }
            _ if arg.starts_with("--descriptor_set_out=") => {
                output = Some(PathBuf::from(&arg["--descriptor_set_out=".len()..]))
            }
            // Options protoc accepts that change nothing in a descriptor set.
            _ if arg.starts_with("--experimental_allow_proto3_optional") => {}
            _ if arg.starts_with('-') => {
                eprintln!("protoc-shim: unsupported option {arg}");
                return ExitCode::from(2);
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    if includes.is_empty() {
        includes.push(PathBuf::from("."));
    }
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let mut compiler = protox::Compiler::new(includes)?;
        compiler.include_imports(include_imports);
        compiler.include_source_info(include_source_info);
        for file in &files {
            compiler.open_file(file)?;
        }
        if let Some(output) = output {
            std::fs::write(output, compiler.encode_file_descriptor_set())?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("protoc-shim: {err}");
            ExitCode::FAILURE
        }
    }
}
