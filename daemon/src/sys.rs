//! The daemon's only unsafe code: two Linux interfaces with no safe wrapper
//! in our dependencies.
//!
//! - [`open_in_root`]: `openat2(RESOLVE_IN_ROOT)` under /proc/PID/root, so a
//!   container's symlinks resolve inside the container (a link to
//!   `/etc/x` must not make us measure the host's `/etc/x`).
//! - [`ProcConnector`]: the kernel's process-event connector (netlink
//!   `NETLINK_CONNECTOR`, group `CN_IDX_PROC`), which reports every exec and
//!   exit as it happens. Needs CAP_NET_ADMIN (root).
//!
//! - Files in a measured process's root ([`open_dir_in_root`],
//!   [`write_at`], [`remove_at`]: Sentry token files) and pidfds ([`peer_pidfd`],
//!   [`pidfd_open`], [`pidfd_signal`]): identify a caller by the process,
//!   not by a pid that can be reused.
//!
//! Trust boundary: netlink messages come from the kernel (checked: sender
//! port id 0) and are parsed with bounds checks; paths come from measured
//! processes and are confined by the kernel's RESOLVE_IN_ROOT.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Opens `path` (as the process sees it) read-only, resolving every
/// component inside /proc/PID/root, never following magic links.
pub fn open_in_root(pid: u32, path: &str) -> io::Result<File> {
    let root = File::open(format!("/proc/{pid}/root"))?;
    let fd = openat2_in_root(
        &root,
        path,
        libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
        0,
    )?;
    Ok(File::from(fd))
}

fn cpath(rel: &str) -> io::Result<CString> {
    CString::new(rel).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// `openat2(dir, path, flags, mode)` with RESOLVE_IN_ROOT and
/// RESOLVE_NO_MAGICLINKS: `dir` acts as `/` for every component.
fn openat2_in_root(dir: &File, path: &str, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let c = cpath(rel)?;
    // SAFETY: open_how is plain data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = u64::from(mode);
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `dir` is an open directory fd for the duration of the call,
    // `c` is a NUL-terminated string, and `how` is a fully initialised
    // open_how whose size we pass; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Splits an in-root path into (parent directory, file name).
pub fn split_file(path: &str) -> io::Result<(&str, &str)> {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path:?} does not name a file"),
        ));
    }
    Ok((if dir.is_empty() { "/" } else { dir }, name))
}

/// Opens directory `dir` (as the process sees it) inside /proc/PID/root.
pub fn open_dir_in_root(pid: u32, dir: &str) -> io::Result<File> {
    let root = File::open(format!("/proc/{pid}/root"))?;
    Ok(File::from(openat2_in_root(
        &root,
        dir,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?))
}

/// Atomically replaces file `name` in directory `dir` with `data` (mode
/// 0600, owned by `uid`:`gid`): a temporary file is written, fsync'd and
/// renamed over the target. A symlink at `name` is replaced, never
/// followed. vouchd runs as root and the path comes from a process's
/// environment, so unless `uid` is root the directory and any existing
/// file must already belong to `uid`: a process can only have vouchd write
/// where it could write itself.
pub fn write_at(dir: &File, name: &str, data: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    if uid != 0 {
        let not_theirs = |what: &str| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{what} is not owned by uid {uid}"),
            )
        };
        if dir.metadata()?.uid() != uid {
            return Err(not_theirs("the directory"));
        }
        let cname = cpath(name)?;
        // SAFETY: zeroed stat is valid; dir open; cname NUL-terminated.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the kernel writes st.
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                cname.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 && st.st_uid != uid {
            return Err(not_theirs("the existing file"));
        }
    }
    let tmp = format!(".{name}.vouch-{}", std::process::id());
    let ctmp = cpath(&tmp)?;
    let cname = cpath(name)?;
    // SAFETY: dir is open; ctmp is NUL-terminated; unlinking a stale
    // temporary of ours is harmless if it does not exist.
    unsafe { libc::unlinkat(dir.as_raw_fd(), ctmp.as_ptr(), 0) };
    // SAFETY: as above; O_EXCL|O_NOFOLLOW create a fresh regular file.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            ctmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let result = (|| {
        // SAFETY: f is an open fd we own.
        if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f.write_all(data)?;
        f.sync_all()?;
        // SAFETY: dir open; both names NUL-terminated.
        if unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                ctmp.as_ptr(),
                dir.as_raw_fd(),
                cname.as_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })();
    if result.is_err() {
        // SAFETY: as above.
        unsafe { libc::unlinkat(dir.as_raw_fd(), ctmp.as_ptr(), 0) };
    }
    result
}

/// Removes file `name` from directory `dir` (a final symlink itself is
/// removed). Missing is success.
pub fn remove_at(dir: &File, name: &str) -> io::Result<()> {
    let cname = cpath(name)?;
    // SAFETY: dir open; cname NUL-terminated.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), cname.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    Ok(())
}

/// Removes the file at the in-root `path` of process `pid`.
pub fn remove_in_root(pid: u32, path: &str) -> io::Result<()> {
    let (dir, name) = split_file(path)?;
    let d = open_dir_in_root(pid, dir)?;
    remove_at(&d, name)
}

/// A pidfd for the process at the other end of a connected unix socket,
/// taken by the kernel at connect time (`SO_PEERPIDFD`, Linux 6.5+): it
/// names that exact process, so a later pid reuse cannot be mistaken for it.
pub fn peer_pidfd(sock: &impl AsRawFd) -> io::Result<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd/len point to properly sized locals the kernel writes.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_open(pid)`.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` through a pidfd (never to a process that reused the pid).
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd is open; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid a pidfd refers to, or None once that process has exited
/// (`/proc/self/fdinfo` reports `Pid: -1`).
pub fn pidfd_pid(pidfd: &OwnedFd) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
}

/// A datagram netlink socket of `protocol` (close-on-exec).
fn netlink_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An exec or exit reported by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// A process (thread-group leader) called execve.
    Exec {
        /// The pid.
        pid: u32,
    },
    /// A process (thread-group leader) exited.
    Exit {
        /// The pid.
        pid: u32,
    },
    /// The kernel dropped events (socket buffer full): rescan /proc.
    Overflow,
}

/// A subscription to the kernel's process events.
#[derive(Debug)]
pub struct ProcConnector {
    fd: OwnedFd,
}

const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;

impl ProcConnector {
    /// Subscribes to process events.
    pub fn open() -> io::Result<Self> {
        let fd = netlink_socket(libc::NETLINK_CONNECTOR)?;
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_pid = 0; // let the kernel assign a port id
        addr.nl_groups = libc::CN_IDX_PROC;
        // SAFETY: addr is a valid sockaddr_nl and its size is passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // A larger receive buffer makes overflow under exec storms rarer.
        let size: libc::c_int = 4 << 20;
        // SAFETY: valid fd, option value pointer and length.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        // nlmsghdr + cn_msg + op: PROC_CN_MCAST_LISTEN.
        let total = NLMSG_HDR + CN_MSG + 4;
        let mut msg = Vec::with_capacity(total);
        msg.extend_from_slice(&(total as u32).to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&libc::PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Blocks until the kernel reports events; appends execs and exits of
    /// thread-group leaders to `out`.
    pub fn recv(&self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                out.push(ProcEvent::Overflow);
                return Ok(());
            }
            return Err(e);
        }
        parse_messages(&buf[..n as usize], out);
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a netlink datagram of connector messages (bounds-checked).
pub fn parse_messages(mut b: &[u8], out: &mut Vec<ProcEvent>) {
    while b.len() >= NLMSG_HDR {
        let Some(len) = u32_at(b, 0).map(|l| l as usize) else {
            return;
        };
        if len < NLMSG_HDR || len > b.len() {
            return;
        }
        let msg = &b[..len];
        // proc_event starts after nlmsghdr and cn_msg: what, cpu, timestamp.
        let ev = NLMSG_HDR + CN_MSG;
        if let Some(what) = u32_at(msg, ev) {
            let data = ev + 16;
            let pid = u32_at(msg, data);
            let tgid = u32_at(msg, data + 4);
            if let (Some(pid), Some(tgid)) = (pid, tgid) {
                if pid == tgid {
                    if what == libc::PROC_EVENT_EXEC {
                        out.push(ProcEvent::Exec { pid });
                    } else if what == libc::PROC_EVENT_EXIT {
                        out.push(ProcEvent::Exit { pid });
                    }
                }
            }
        }
        let aligned = (len + 3) & !3;
        b = b.get(aligned..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut v = Vec::new();
            parse_messages(&b, &mut v);
            let mut t = Vec::new();
            let _ = parse_diag(&b, &mut t);
        }
    }

    #[test]
    fn sock_diag_sees_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = tcp_listeners(std::process::id()).unwrap();
        assert!(
            found.iter().any(|t| t.port == port && t.inode != 0),
            "{found:?}"
        );
    }

    #[test]
    fn open_in_root_opens_and_rejects_nul() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        assert!(open_in_root(me, exe.to_str().unwrap()).is_ok());
        assert!(open_in_root(me, "/a\0b").is_err());
        assert!(open_in_root(me, "/definitely/not/here").is_err());
    }
}

/// A TCP listening socket reported by sock_diag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListen {
    /// 4 or 6.
    pub family: u8,
    /// Local address.
    pub addr: std::net::IpAddr,
    /// Local port.
    pub port: u16,
    /// Socket inode.
    pub inode: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN_STATE: u32 = 10;

fn diag_dump(fd: &OwnedFd, family: u8, out: &mut Vec<TcpListen>) -> io::Result<()> {
    // nlmsghdr (16) + inet_diag_req_v2 (56).
    let total = NLMSG_HDR + 56;
    let mut req = Vec::with_capacity(total);
    req.extend_from_slice(&(total as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.push(family);
    req.push(libc::IPPROTO_TCP as u8);
    req.push(0); // ext
    req.push(0); // pad
    req.extend_from_slice(&(1u32 << TCP_LISTEN_STATE).to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: match all
                                       // SAFETY: req is a valid buffer of req.len() bytes.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_diag(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// Parses one datagram of inet_diag replies; true at NLMSG_DONE.
pub fn parse_diag(mut b: &[u8], out: &mut Vec<TcpListen>) -> io::Result<bool> {
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0).unwrap_or(0) as usize;
        if len < NLMSG_HDR || len > b.len() {
            return Ok(true);
        }
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if ty == libc::NLMSG_DONE as u16 {
            return Ok(true);
        }
        if ty == libc::NLMSG_ERROR as u16 {
            let code = u32_at(b, NLMSG_HDR).map_or(0, |c| c as i32);
            return Err(io::Error::from_raw_os_error(-code));
        }
        let m = &b[NLMSG_HDR..len];
        // inet_diag_msg: family, state, timer, retrans, sockid{sport(be16),
        // dport(be16), src[16], dst[16], if(4), cookie(8)}, expires, rqueue,
        // wqueue, uid, inode.
        if m.len() >= 72 {
            let family = m[0];
            let port = u16::from_be_bytes([m[4], m[5]]);
            let addr = if family == libc::AF_INET6 as u8 {
                let mut a = [0u8; 16];
                a.copy_from_slice(&m[8..24]);
                std::net::IpAddr::from(a)
            } else {
                std::net::IpAddr::from([m[8], m[9], m[10], m[11]])
            };
            let inode = u64::from(u32_at(m, 68).unwrap_or(0));
            out.push(TcpListen {
                family: if family == libc::AF_INET6 as u8 { 6 } else { 4 },
                addr,
                port,
                inode,
            });
        }
        let aligned = (len + 3) & !3;
        b = b.get(aligned..).unwrap_or(&[]);
    }
    Ok(false)
}

/// TCP listening sockets (v4 and v6) in the network namespace of `pid`,
/// through sock_diag: unlike /proc/net/tcp it does not walk the kernel's
/// whole established-connection table, so it costs microseconds.
pub fn tcp_listeners(pid: u32) -> io::Result<Vec<TcpListen>> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    // setns(2) changes only the calling thread's namespace: do it on a
    // short-lived thread so the daemon's threads never move.
    std::thread::scope(|s| {
        s.spawn(|| -> io::Result<Vec<TcpListen>> {
            // SAFETY: ns is an open namespace fd; CLONE_NEWNET checks its type.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = netlink_socket(libc::NETLINK_SOCK_DIAG)?;
            let mut out = Vec::new();
            diag_dump(&fd, libc::AF_INET as u8, &mut out)?;
            diag_dump(&fd, libc::AF_INET6 as u8, &mut out)?;
            Ok(out)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread failed")))
    })
}

/// An open /proc directory, for reading many per-process files with
/// openat(2) (no path walk from / for each).
#[derive(Debug)]
pub struct ProcDir {
    fd: OwnedFd,
}

impl ProcDir {
    /// Opens /proc.
    pub fn open() -> io::Result<Self> {
        let f = File::open("/proc")?;
        Ok(Self {
            fd: OwnedFd::from(f),
        })
    }

    /// Reads `rel` (e.g. "1234/comm"), at most `buf`'s capacity, into `buf`.
    pub fn read(&self, rel: &std::ffi::CStr, buf: &mut Vec<u8>) -> io::Result<()> {
        // SAFETY: self.fd is an open directory fd; rel is NUL-terminated.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                rel.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd owned by nobody else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        buf.clear();
        let cap = buf.capacity().max(64);
        buf.reserve(cap);
        // SAFETY: the spare capacity is writable for `cap` bytes.
        let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), cap) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: read(2) initialised n <= cap bytes.
        unsafe { buf.set_len(n as usize) };
        Ok(())
    }
}
