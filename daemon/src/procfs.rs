//! Readers for the /proc files vouchd measures.
//!
//! Owns parsing of /proc/PID/{stat,comm,exe,cmdline,environ,status,cgroup,
//! ns/net,fd} and /proc/PID/net/{tcp,tcp6,unix}. Trust boundary: every file
//! here is written by the kernel but describes processes we do not trust
//! (argv and environ are arbitrary bytes; comm is set by the process); and a
//! process can exit mid-read. Every reader returns `io::Result` and never
//! panics; callers turn failures into error fields, not crashes.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// /proc/PID/<rest>.
pub fn path(pid: u32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// What /proc/PID/stat says that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Command name (field 2), as the process may have set it.
    pub comm: String,
    /// Parent pid (field 4).
    pub ppid: u32,
    /// Start time in clock ticks since boot (field 22).
    pub start_time: u64,
}

/// Parses the content of /proc/PID/stat. comm may contain spaces and ')',
/// so it is taken between the first '(' and the last ')'.
pub fn parse_stat(buf: &[u8]) -> Option<Stat> {
    let open = buf.iter().position(|b| *b == b'(')?;
    let close = buf.iter().rposition(|b| *b == b')')?;
    if close < open {
        return None;
    }
    let comm = String::from_utf8_lossy(&buf[open + 1..close]).into_owned();
    let rest = std::str::from_utf8(buf.get(close + 1..)?).ok()?;
    let mut it = rest.split_ascii_whitespace();
    // Fields from 3 (state) on; ppid is field 4, starttime field 22.
    let _state = it.next()?;
    let ppid = it.next()?.parse().ok()?;
    let start_time = it.nth(17)?.parse().ok()?;
    Some(Stat {
        comm,
        ppid,
        start_time,
    })
}

/// Reads a small /proc file into `buf` (one read is atomic for these).
fn read_small(p: &std::path::Path, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    fs::File::open(p)?.read_to_end(buf)?;
    Ok(())
}

/// Reads and parses /proc/PID/stat.
pub fn stat(pid: u32) -> io::Result<Stat> {
    let mut buf = Vec::with_capacity(512);
    read_small(&path(pid, "stat"), &mut buf)?;
    parse_stat(&buf).ok_or_else(|| invalid("unparsable /proc/PID/stat"))
}

/// Reads /proc/PID/comm (the cheapest per-process read) into `buf`,
/// without the trailing newline.
pub fn comm_into(pid: u32, buf: &mut Vec<u8>) -> io::Result<()> {
    read_small(&path(pid, "comm"), buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok(())
}

/// Numeric entries of /proc.
pub fn pids() -> io::Result<Vec<u32>> {
    let mut out = Vec::with_capacity(1024);
    for e in fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(pid);
        }
    }
    Ok(out)
}

/// The executable link: its path and whether the kernel marks it deleted.
pub fn exe_link(pid: u32) -> io::Result<(String, bool)> {
    let target = fs::read_link(path(pid, "exe"))?;
    let s = target.to_string_lossy().into_owned();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(p) => (p.to_owned(), true),
        None => (s, false),
    })
}

/// (device, inode, size) of the running executable's inode.
pub fn exe_inode(pid: u32) -> io::Result<(u64, u64, u64)> {
    let m = fs::metadata(path(pid, "exe"))?;
    Ok((m.dev(), m.ino(), m.size()))
}

/// NUL-separated /proc file (cmdline, environ) split into items.
fn nul_split(buf: &[u8]) -> Vec<Vec<u8>> {
    let mut items: Vec<Vec<u8>> = buf.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    if items.last().is_some_and(Vec::is_empty) {
        items.pop();
    }
    items
}

/// argv as raw bytes.
pub fn cmdline(pid: u32) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = Vec::new();
    read_small(&path(pid, "cmdline"), &mut buf)?;
    Ok(nul_split(&buf))
}

/// The environment as (name, value) byte pairs.
pub fn environ(pid: u32) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    read_small(&path(pid, "environ"), &mut buf)?;
    Ok(nul_split(&buf)
        .into_iter()
        .filter_map(|kv| {
            let eq = kv.iter().position(|b| *b == b'=')?;
            Some((kv[..eq].to_vec(), kv[eq + 1..].to_vec()))
        })
        .collect())
}

/// Real uid and gid from /proc/PID/status.
pub fn ids(pid: u32) -> io::Result<(u32, u32)> {
    let s = fs::read_to_string(path(pid, "status"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    match (field("Uid:"), field("Gid:")) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(invalid("no Uid/Gid in /proc/PID/status")),
    }
}

/// Inode of the network namespace.
pub fn netns(pid: u32) -> io::Result<u64> {
    let l = fs::read_link(path(pid, "ns/net"))?;
    let s = l.to_string_lossy();
    s.strip_prefix("net:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| invalid("unexpected ns/net link"))
}

/// The cgroup path: the unified (v2) entry if present, else the systemd
/// named hierarchy, else the first entry.
pub fn cgroup(pid: u32) -> io::Result<String> {
    let s = fs::read_to_string(path(pid, "cgroup"))?;
    let entries: Vec<(&str, &str)> = s
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            Some((it.next()?, it.next()?))
        })
        .collect();
    let pick = entries
        .iter()
        .find(|(c, _)| c.is_empty())
        .or_else(|| entries.iter().find(|(c, _)| *c == "name=systemd"))
        .or_else(|| entries.first());
    Ok(pick.map(|(_, p)| (*p).to_owned()).unwrap_or_default())
}

/// Inodes of the sockets the process holds open.
pub fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let mut out = HashSet::new();
    for e in fs::read_dir(path(pid, "fd"))? {
        let Ok(e) = e else { continue };
        let Ok(l) = fs::read_link(e.path()) else {
            continue;
        };
        let s = l.to_string_lossy();
        if let Some(n) = s
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            out.insert(n);
        }
    }
    Ok(out)
}

/// A listening socket in a network namespace, with its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsListener {
    /// "tcp", "tcp6" or "unix".
    pub proto: &'static str,
    /// IP address or socket path.
    pub address: String,
    /// TCP port (0 for unix).
    pub port: u16,
    /// Socket inode.
    pub inode: u64,
}

fn parse_hex_ip(hex: &str, v6: bool) -> Option<String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    // The kernel prints each 32-bit word in host (little-endian) order.
    let mut fixed = Vec::with_capacity(bytes.len());
    for w in bytes.chunks(4) {
        fixed.extend(w.iter().rev());
    }
    if v6 {
        let a: [u8; 16] = fixed.try_into().ok()?;
        Some(std::net::Ipv6Addr::from(a).to_string())
    } else {
        let a: [u8; 4] = fixed.try_into().ok()?;
        Some(std::net::Ipv4Addr::from(a).to_string())
    }
}

/// Parses /proc/net/tcp or tcp6 content: LISTEN (state 0A) entries.
pub fn parse_tcp(content: &str, v6: bool) -> Vec<NsListener> {
    content
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (ip, port) = f.get(1)?.split_once(':')?;
            Some(NsListener {
                proto: if v6 { "tcp6" } else { "tcp" },
                address: parse_hex_ip(ip, v6)?,
                port: u16::from_str_radix(port, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Parses /proc/net/unix content: listening (flag __SO_ACCEPTCON) sockets
/// with a path.
pub fn parse_unix(content: &str) -> Vec<NsListener> {
    content
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            if flags & 0x0001_0000 == 0 {
                return None;
            }
            let path = f.get(7)?;
            Some(NsListener {
                proto: "unix",
                address: (*path).to_owned(),
                port: 0,
                inode: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

/// All listening sockets in the network namespace of `pid`: TCP through
/// sock_diag (cheap), falling back to /proc/PID/net/tcp{,6} (which walks the
/// kernel's whole connection table: milliseconds per read), and unix
/// sockets from /proc/PID/net/unix.
pub fn ns_listeners(pid: u32) -> io::Result<Vec<NsListener>> {
    let mut out = match crate::sys::tcp_listeners(pid) {
        Ok(v) => v
            .into_iter()
            .map(|t| NsListener {
                proto: if t.family == 6 { "tcp6" } else { "tcp" },
                address: t.addr.to_string(),
                port: t.port,
                inode: t.inode,
            })
            .collect(),
        Err(_) => {
            let mut v = parse_tcp(&fs::read_to_string(path(pid, "net/tcp"))?, false);
            if let Ok(s) = fs::read_to_string(path(pid, "net/tcp6")) {
                v.extend(parse_tcp(&s, true));
            }
            v
        }
    };
    if let Ok(s) = fs::read_to_string(path(pid, "net/unix")) {
        out.extend(parse_unix(&s));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stat_with_parens_in_comm() {
        let s = b"42 (we(ir) d)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "we(ir) d)");
        assert_eq!(st.ppid, 1);
        assert_eq!(st.start_time, 987654);
    }

    #[test]
    fn tcp_listen_lines() {
        let c = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0DAC 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0DAD 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12346 1";
        let l = parse_tcp(c, false);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].address, "127.0.0.1");
        assert_eq!(l[0].port, 3500);
        assert_eq!(l[0].inode, 12345);
    }

    #[test]
    fn own_process_reads() {
        let me = std::process::id();
        assert!(stat(me).is_ok());
        assert!(exe_link(me).is_ok());
        assert!(netns(me).is_ok());
        assert!(!cmdline(me).unwrap().is_empty());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_stat(&b);
            let s = String::from_utf8_lossy(&b);
            let _ = parse_tcp(&s, false);
            let _ = parse_tcp(&s, true);
            let _ = parse_unix(&s);
            let _ = nul_split(&b);
        }
    }
}
