//! The control socket: how the CLI talks to the running daemon.
//!
//! One JSON request line in, one JSON response line out, over a Unix stream
//! socket. Only root may use it: the daemon checks the caller's uid with
//! SO_PEERCRED before reading a byte of the request, and answers anyone else
//! with a clear refusal. A client may pass its stdin descriptor along
//! (SCM_RIGHTS) so the daemon can check for itself that a human's terminal is
//! behind a request (approvals), rather than trusting the client's word.
//!
//! The socket is served on its own thread; requests reach the event loop
//! through a channel, so a slow or hostile client can't stall it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default)]
        all: bool,
    },
    Deploy {
        service: String,
        grace_s: u64,
        reason: String,
    },
    ProtectList,
    Approve {
        path: String,
        for_s: u64,
        reason: String,
        confirm: Option<String>,
    },
    ApproveEnd {
        path: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl Response {
    pub fn ok(data: Value) -> Self {
        Response {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: Value::Null,
        }
    }
}

/// Who is on the other end (from SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// A request on its way to the event loop.
pub struct Incoming {
    pub req: Request,
    pub peer: Peer,
    /// The client's stdin, when it passed it.
    pub stdin: Option<OwnedFd>,
    pub reply: std::sync::mpsc::SyncSender<Response>,
}

pub fn peer_cred(fd: RawFd) -> std::io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred into the buffer we own, of the
    // length we pass.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Receives the first chunk of a request and at most one passed descriptor.
fn recv_with_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    // Room for one int in a control message, aligned as cmsghdr requires.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: every pointer in msg refers to buffers that outlive the call;
    // MSG_CMSG_CLOEXEC keeps a passed fd from leaking into children.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut passed = None;
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel filled,
    // bounded by msg_controllen; we only read SCM_RIGHTS payloads of the
    // declared length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // Keep the first; close any extras.
                    let owned = OwnedFd::from_raw_fd(fd);
                    if passed.is_none() {
                        passed = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, passed))
}

/// Whether a descriptor is a terminal.
pub fn is_tty(fd: &OwnedFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// The (major, minor) of the terminal a descriptor is, `None` when it is
/// no terminal.
pub fn terminal_of(fd: &OwnedFd) -> Option<(u32, u32)> {
    if !is_tty(fd) {
        return None;
    }
    let file = std::fs::File::from(fd.try_clone().ok()?);
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_char_device() {
        return None;
    }
    let rdev = meta.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// The controlling terminal of a live process (field 7 of
/// `/proc/PID/stat`, the kernel's `tty_nr`), `None` when it has none.
pub fn controlling_terminal(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // rest starts at field 3 (state); tty_nr is field 7.
    let tty_nr: u32 = rest.split_whitespace().nth(4)?.parse().ok()?;
    if tty_nr == 0 {
        return None;
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    Some((major, minor))
}

fn write_response(stream: &mut UnixStream, resp: &Response) {
    if let Ok(mut line) = serde_json::to_string(resp) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

fn handle(mut stream: UnixStream, tx: &tokio::sync::mpsc::Sender<Incoming>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let peer = peer_cred(stream.as_raw_fd())?;
    if peer.uid != 0 {
        write_response(
            &mut stream,
            &Response::err(format!(
                "permission denied: governor's control socket is for root only (you are uid {}); run the command with sudo",
                peer.uid
            )),
        );
        return Ok(());
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    let (mut n, stdin) = recv_with_fd(stream.as_raw_fd(), &mut buf)?;
    while !buf[..n].contains(&b'\n') {
        if n == buf.len() {
            write_response(&mut stream, &Response::err("request too long"));
            return Ok(());
        }
        let m = stream.read(&mut buf[n..])?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            write_response(&mut stream, &Response::err(format!("bad request: {e}")));
            return Ok(());
        }
    };
    let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
    if tx
        .blocking_send(Incoming {
            req,
            peer,
            stdin,
            reply: reply_tx,
        })
        .is_err()
    {
        write_response(&mut stream, &Response::err("the daemon is shutting down"));
        return Ok(());
    }
    let resp = reply_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| Response::err("the daemon did not answer in time"));
    write_response(&mut stream, &resp);
    Ok(())
}

/// Binds the socket (replacing a stale one) and serves it on a thread.
pub fn serve(path: &Path, tx: tokio::sync::mpsc::Sender<Incoming>) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another governor is already serving {} — stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // Anyone may connect so that refusals are explained; SO_PEERCRED decides.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    std::thread::Builder::new()
        .name("governor-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = handle(s, &tx) {
                            log::warn!("control connection: {e:#}");
                        }
                    }
                    Err(e) => log::warn!("control socket accept: {e}"),
                }
                if tx.is_closed() {
                    break;
                }
            }
        })
        .context("starting the control thread")?;
    Ok(path.to_path_buf())
}

/// Sends one request to the daemon at `socket` and returns its response.
pub fn request(socket: &Path, req: &Request, pass_stdin: bool) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is the daemon running? (governor run)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "the control socket is for root only; run with sudo"
            }
            _ => "",
        };
        anyhow::anyhow!("cannot connect to {}: {e}. {hint}", socket.display())
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(90)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    let sent = if pass_stdin {
        send_with_fd(stream.as_raw_fd(), &line, 0)
    } else {
        stream.write_all(&line).map_err(Into::into)
    };
    // The daemon may refuse (and hang up) before reading the request; its
    // answer is still waiting to be read, so a failed write isn't the end.
    let mut resp = String::new();
    BufReader::new(&stream)
        .read_line(&mut resp)
        .context("reading the daemon's answer")?;
    if resp.is_empty() {
        sent?;
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&resp).context("parsing the daemon's answer")
}

fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> Result<()> {
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: zeroed msghdr is valid; all pointers refer to live buffers; the
    // control message is built with the CMSG_* macros within cmsg's size.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
        let n = libc::sendmsg(sock, &msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if (n as usize) < data.len() {
            let rest = &data[n as usize..];
            let mut s = std::mem::ManuallyDrop::new(UnixStream::from_raw_fd(sock));
            s.write_all(rest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Deploy {
            service: "lily".into(),
            grace_s: 60,
            reason: "v2".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","evil":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm-rf"}"#).is_err());
    }

    /// A full round trip through a real socket, passing stdin along.
    #[test]
    fn serves_root_and_passes_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("g.sock");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Incoming>(4);
        serve(&sock, tx).unwrap();
        let t = std::thread::spawn(move || {
            let inc = rx.blocking_recv().unwrap();
            assert_eq!(inc.req, Request::Status { all: true });
            let got_fd = inc.stdin.is_some();
            inc.reply
                .send(Response::ok(
                    serde_json::json!({ "fd": got_fd, "uid": inc.peer.uid }),
                ))
                .unwrap();
        });
        let resp = request(&sock, &Request::Status { all: true }, true).unwrap();
        t.join().unwrap();
        assert!(resp.ok);
        assert_eq!(resp.data["fd"], true);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(resp.data["uid"], unsafe { libc::geteuid() });
    }
}
