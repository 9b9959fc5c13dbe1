//! A STAND-IN for daprd, for Vouch's tests. It is not Dapr.
//!
//! It takes daprd's flags (Go flag syntax), listens on the TCP ports daprd
//! would (`--dapr-http-port` 3500, `--dapr-grpc-port` 50001, and the public,
//! internal-gRPC and profiling ports when given) on `--dapr-listen-addresses`
//! (all interfaces by default), or on unix sockets in `--unix-domain-socket`
//! (`dapr-http-<app-id>.socket`, `dapr-grpc-<app-id>.socket`), and reads every
//! `--config` file and every file under each `--resources-path` /
//! `--components-path`, as daprd does at start. Then it waits until killed,
//! accepting and closing connections. `--exit-after-ms N` exits on its own.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

fn main() {
    // Like daprd (Go), accept any bytes in argv.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let get = |name: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 1;
        while i < args.len() {
            let a = args[i].trim_start_matches('-');
            if let Some((n, v)) = a.split_once('=') {
                if n == name {
                    out.push(v.to_owned());
                }
            } else if a == name {
                if let Some(v) = args.get(i + 1) {
                    out.push(v.clone());
                    i += 1;
                }
            }
            i += 1;
        }
        out
    };
    let one = |v: Vec<String>| v.into_iter().last();
    let app_id = one(get("app-id")).unwrap_or_else(|| "standin".into());
    let http = one(get("dapr-http-port")).unwrap_or_else(|| "3500".into());
    let grpc = one(get("dapr-grpc-port")).unwrap_or_else(|| "50001".into());
    let mut ports = vec![http, grpc];
    ports.extend(one(get("dapr-public-port")));
    ports.extend(one(get("dapr-internal-grpc-port")));
    let addrs: Vec<String> = one(get("dapr-listen-addresses"))
        .map(|s| s.split(',').map(|a| a.trim().to_owned()).collect())
        .unwrap_or_else(|| vec!["0.0.0.0".into()]);
    let uds = one(get("unix-domain-socket"));
    let exit_after = one(get("exit-after-ms")).and_then(|v| v.parse::<u64>().ok());

    // Read the files daprd reads at start.
    let mut read = 0usize;
    for c in get("config") {
        if let Ok(mut f) = std::fs::File::open(&c) {
            let mut s = Vec::new();
            let _ = f.read_to_end(&mut s);
            read += 1;
        }
    }
    let mut dirs = get("resources-path");
    dirs.extend(get("components-path"));
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    read += usize::from(b.len() < usize::MAX);
                }
            }
        }
    }

    let mut tcp = Vec::new();
    let mut unix = Vec::new();
    match uds {
        Some(dir) => {
            for kind in ["http", "grpc"] {
                let p = format!("{}/dapr-{kind}-{app_id}.socket", dir.trim_end_matches('/'));
                let _ = std::fs::remove_file(&p);
                match UnixListener::bind(&p) {
                    Ok(l) => unix.push(l),
                    Err(e) => eprintln!("stand-in daprd: cannot listen on {p}: {e}"),
                }
            }
        }
        None => {
            for a in &addrs {
                let host = if a == "localhost" {
                    "127.0.0.1"
                } else {
                    a.as_str()
                };
                for p in &ports {
                    let spec = if host.contains(':') {
                        format!("[{host}]:{p}")
                    } else {
                        format!("{host}:{p}")
                    };
                    match TcpListener::bind(&spec) {
                        Ok(l) => tcp.push(l),
                        Err(e) => eprintln!("stand-in daprd: cannot listen on {spec}: {e}"),
                    }
                }
            }
        }
    }
    eprintln!(
        "stand-in daprd {app_id}: pid {}, {} tcp + {} unix listeners, {read} files read",
        std::process::id(),
        tcp.len(),
        unix.len()
    );
    for l in tcp {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
    for l in unix {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
    match exit_after {
        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
        None => loop {
            std::thread::park();
        },
    }
}
