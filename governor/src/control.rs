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
    io::{BufRead, BufReader, IoSlice, IoSliceMut, IsTerminal, Read, Write},
    mem::MaybeUninit,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// MCP calls served at once (each holds a thread while the daemon answers).
const MAX_MCP_CONNECTIONS: usize = 8;

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
        /// Watched files the deploy changes (`[drift] watch`): changes to
        /// them during the deploy are its own, not drift.
        #[serde(default)]
        files: Vec<String>,
        /// The deploy's command finished: declare the files' new content.
        #[serde(default)]
        finish: bool,
    },
    /// Open drift items, or (`accept`: a watched path or a service) resolve
    /// one with a reason.
    Drift {
        #[serde(default)]
        accept: Option<String>,
        #[serde(default)]
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
    KillSwitch {
        action: KillAction,
        #[serde(default)]
        scope: Vec<String>,
        #[serde(default)]
        reason: String,
    },
    /// One tool call of `governor mcp` (an agent's MCP client), answered
    /// for the calling agent: the only request the MCP socket accepts.
    Mcp {
        call: McpCall,
    },
    /// The numbers `/metrics` renders (also answered on the control socket,
    /// root only, for `curl`-less debugging).
    Metrics,
}

/// The MCP tools, as `governor mcp` forwards them (`governor-mcp` builds
/// `{"tool": NAME, ...args}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "tool", rename_all = "snake_case", deny_unknown_fields)]
pub enum McpCall {
    /// All services, or one; without one, from a supervised caller, its own.
    Status {
        #[serde(default)]
        service: Option<String>,
    },
    /// A file's tier and whether a write would be refused now.
    ProtectCheck {
        path: String,
    },
    /// Ask a person (Telegram) for a write window; never opens one itself.
    RequestApproval {
        path: String,
        reason: String,
        /// Like `10m`.
        duration: String,
    },
    MemoryHeadroom {},
    MayStartJob {
        expected_bytes: u64,
    },
    AuditTail {
        #[serde(default)]
        n: Option<u32>,
    },
    KillSwitchEngage {
        scope: Vec<String>,
        reason: String,
    },
}

impl McpCall {
    pub fn tool(&self) -> &'static str {
        match self {
            McpCall::Status { .. } => "status",
            McpCall::ProtectCheck { .. } => "protect_check",
            McpCall::RequestApproval { .. } => "request_approval",
            McpCall::MemoryHeadroom {} => "memory_headroom",
            McpCall::MayStartJob { .. } => "may_start_job",
            McpCall::AuditTail { .. } => "audit_tail",
            McpCall::KillSwitchEngage { .. } => "kill_switch_engage",
        }
    }
}

/// Which socket a request came in on: what it may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The control socket: root only, every request.
    Control,
    /// `[mcp] socket`: any member of its group, MCP requests only,
    /// answered for the caller's own service.
    Mcp,
}

/// `governor kill-switch engage|release|status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillAction {
    Engage,
    Release,
    Status,
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
    pub via: Via,
}

// Not rustix's `socket_peercred`: its `UCred` holds the pid as a non-zero
// `Pid`, but the kernel reports 0 for a peer whose pid namespace we can't
// see, and rustix 1.1 would then hold an invalid value. Here 0 is just 0.
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
fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    // MSG_CMSG_CLOEXEC keeps a passed fd from leaking into children.
    let msg = recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    // Keep the first descriptor; any extras are closed as they drop (the
    // kernel closes those that didn't fit the buffer).
    let passed = cmsg
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .next();
    Ok((msg.bytes, passed))
}

/// Whether a descriptor is a terminal.
pub fn is_tty(fd: &OwnedFd) -> bool {
    fd.is_terminal()
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
    Some((rustix::fs::major(rdev), rustix::fs::minor(rdev)))
}

/// The controlling terminal of a live process (field 7 of
/// `/proc/PID/stat`, the kernel's `tty_nr`), `None` when it has none.
pub fn controlling_terminal(pid: u32) -> Option<(u32, u32)> {
    use procfs::FromRead;
    let stat = procfs::process::Stat::from_file(format!("/proc/{pid}/stat")).ok()?;
    terminal_in(&stat)
}

fn terminal_in(stat: &procfs::process::Stat) -> Option<(u32, u32)> {
    if stat.tty_nr == 0 {
        return None;
    }
    let (major, minor) = stat.tty_nr();
    Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?))
}

fn write_response(stream: &mut UnixStream, resp: &Response) {
    if let Ok(mut line) = serde_json::to_string(resp) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

fn handle(
    mut stream: UnixStream,
    tx: &tokio::sync::mpsc::Sender<Incoming>,
    via: Via,
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let peer = peer_cred(stream.as_raw_fd())?;
    if via == Via::Control && peer.uid != 0 {
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
    let (mut n, stdin) = recv_with_fd(&stream, &mut buf)?;
    // The whole request within 5 s, not 5 s per byte: a client that
    // trickles must not hold a connection slot.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !buf[..n].contains(&b'\n') {
        if n == buf.len() {
            write_response(&mut stream, &Response::err("request too long"));
            return Ok(());
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            write_response(&mut stream, &Response::err("request too slow"));
            return Ok(());
        }
        stream.set_read_timeout(Some(left))?;
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
    if via == Via::Mcp && !matches!(req, Request::Mcp { .. }) {
        write_response(
            &mut stream,
            &Response::err(
                "the MCP socket answers MCP tool calls only (governor mcp); \
                 other commands need root on the control socket",
            ),
        );
        return Ok(());
    }
    let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
    if tx
        .blocking_send(Incoming {
            req,
            peer,
            stdin,
            reply: reply_tx,
            via,
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

/// Binds the control socket (replacing a stale one) and serves it on a
/// thread.
pub fn serve(path: &Path, tx: tokio::sync::mpsc::Sender<Incoming>) -> Result<PathBuf> {
    // Anyone may connect so that refusals are explained; SO_PEERCRED decides.
    serve_on(path, tx, Via::Control, 0o666, None)
}

/// Binds the MCP socket: mode 0660, owned by root and `gid` (the group
/// whose members' agents may ask), so only they can connect at all;
/// SO_PEERCRED still says who each caller is.
pub fn serve_mcp(
    path: &Path,
    gid: Option<u32>,
    tx: tokio::sync::mpsc::Sender<Incoming>,
) -> Result<PathBuf> {
    serve_on(
        path,
        tx,
        Via::Mcp,
        if gid.is_some() { 0o660 } else { 0o600 },
        gid,
    )
}

fn serve_on(
    path: &Path,
    tx: tokio::sync::mpsc::Sender<Incoming>,
    via: Via,
    mode: u32,
    gid: Option<u32>,
) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if via == Via::Mcp {
            // Agents can reach this socket: its directory must be root's
            // and writable by nobody else, or one could plant a socket or
            // a symlink where the daemon binds and chowns.
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::symlink_metadata(dir)?;
            let m = md.permissions().mode();
            if md.uid() != 0 || m & 0o022 != 0 || !md.is_dir() {
                bail!(
                    "mcp.socket {}: its directory must be a root-owned directory nobody else can write (it is uid {}, mode {:o}); use /run/governor/mcp.sock",
                    path.display(),
                    md.uid(),
                    m & 0o7777
                );
            }
            // Group members must be able to reach the socket through its
            // directory (created 0755 by default; make sure of o+x).
            if m & 0o001 == 0 && gid.is_some() {
                log::warn!(
                    "{}: the MCP socket's directory is not searchable by others (mode {:o}); agents may not reach it",
                    dir.display(),
                    m & 0o7777
                );
            }
        }
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
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let name = match via {
        Via::Control => "governor-control",
        Via::Mcp => "governor-mcp-socket",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // The MCP socket's callers aren't root: one that connects and
            // says nothing must not hold up the others, so each connection
            // gets its own thread, at most MAX_MCP_CONNECTIONS at once.
            let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for conn in listener.incoming() {
                match conn {
                    Ok(mut s) if via == Via::Mcp => {
                        use std::sync::atomic::Ordering;
                        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_MCP_CONNECTIONS {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            write_response(
                                &mut s,
                                &Response::err("too many MCP calls in flight; try again"),
                            );
                            continue;
                        }
                        let (tx, b) = (tx.clone(), busy.clone());
                        let spawned = std::thread::Builder::new()
                            .name("governor-mcp-call".into())
                            .spawn(move || {
                                if let Err(e) = handle(s, &tx, via) {
                                    log::warn!("MCP connection: {e:#}");
                                }
                                b.fetch_sub(1, Ordering::SeqCst);
                            });
                        if let Err(e) = spawned {
                            busy.fetch_sub(1, Ordering::SeqCst);
                            log::warn!("MCP connection: no thread: {e}");
                        }
                    }
                    Ok(s) => {
                        if let Err(e) = handle(s, &tx, via) {
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

/// Asks the event loop from inside the daemon (the metrics server), as
/// root on the control socket would; the answer's `data` or its error.
pub async fn ask_loop(
    tx: &tokio::sync::mpsc::Sender<Incoming>,
    req: Request,
) -> std::result::Result<Value, String> {
    let (reply, rx) = std::sync::mpsc::sync_channel(1);
    tx.send(Incoming {
        req,
        peer: Peer {
            pid: std::process::id() as i32,
            uid: 0,
            gid: 0,
        },
        stdin: None,
        reply,
        via: Via::Control,
    })
    .await
    .map_err(|_| "the daemon is shutting down".to_string())?;
    let resp = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "the daemon did not answer in time".to_string())?;
    if resp.ok {
        Ok(resp.data)
    } else {
        Err(resp.error.unwrap_or_else(|| "refused".into()))
    }
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
        send_with_fd(&stream, &line, std::io::stdin().as_fd())
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

fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        bail!("no room for the descriptor in the control message");
    }
    let n = sendmsg(sock, &[IoSlice::new(data)], &mut cmsg, SendFlags::empty())?;
    // The descriptor went with the first byte; the rest is plain data.
    let mut sock = sock;
    sock.write_all(&data[n..])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_from_tty_nr() {
        use procfs::FromRead;
        let stat = |tty_nr: u32| {
            let line = format!(
                "9 (a) S) S 1 9 9 {tty_nr} 9 0 0 0 0 0 0 0 0 0 20 0 1 0 5 1 2 3 \
                 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0"
            );
            procfs::process::Stat::from_read(line.as_bytes()).unwrap()
        };
        assert_eq!(terminal_in(&stat(0)), None);
        // /dev/pts/1: major 136; /dev/pts/300 needs the minor's high bits.
        assert_eq!(terminal_in(&stat(136 << 8 | 1)), Some((136, 1)));
        let nr = 136 << 8 | (300 & 0xff) | ((300 & !0xff) << 12);
        assert_eq!(terminal_in(&stat(nr)), Some((136, 300)));
    }

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Deploy {
            files: Vec::new(),
            finish: false,
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
        assert_eq!(resp.data["uid"], rustix::process::geteuid().as_raw());
    }
}
