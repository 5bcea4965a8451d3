//! Knowing when a client went away. hyper notices a peer's EOF while a request is in
//! flight, but poem keeps driving the request's handler to completion, so a handler
//! waiting for the worker would never learn that nobody listens. This acceptor wraps
//! each TCP stream to record that EOF, and handlers look their connection up by the
//! peer address (unique among open connections).
//!
//! The same wrapper closes connections that hold the server without using it (poem sets
//! no read timeouts on hyper): while no request of a connection is being handled (see
//! [`Connection::begin`]), it must start a request head within
//! [`ConnTimeouts::keep_alive`] and finish it within [`ConnTimeouts::head`] of its first
//! byte, and a stalled write is given up after `keep_alive`. Bodies have their own limit
//! ([`ConnTimeouts::body`], applied where they are read).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

/// How long a connection may hold the server without using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// An idle connection (no request being handled or arriving) is closed after this.
    pub keep_alive: Duration,
    /// A request head must arrive within this of its first byte.
    pub head: Duration,
    /// A request body must arrive within this of the handler starting to read it (408).
    pub body: Duration,
}

impl Default for ConnTimeouts {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(75),
            head: Duration::from_secs(10),
            body: Duration::from_secs(60),
        }
    }
}

/// Where a connection is between requests.
#[derive(Debug)]
struct Idle {
    /// Since when no request has been handled.
    since: Instant,
    /// When the first byte of the next request arrived.
    first_byte: Option<Instant>,
    /// The reader to wake when the deadline changes.
    reader: Option<Waker>,
}

/// One open connection: whether its client has gone, and whether a request is being
/// handled.
#[derive(Debug)]
pub struct Connection {
    gone: watch::Sender<bool>,
    busy: AtomicUsize,
    idle: Mutex<Idle>,
}

/// Marks a request of a [`Connection`] as handled until dropped.
#[derive(Debug)]
pub struct Busy(Arc<Connection>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut idle = self.0.lock_idle();
            idle.since = Instant::now();
            idle.first_byte = None;
            if let Some(w) = idle.reader.take() {
                w.wake();
            }
        }
    }
}

impl Connection {
    fn new() -> Self {
        Self {
            gone: watch::Sender::new(false),
            busy: AtomicUsize::new(0),
            idle: Mutex::new(Idle {
                since: Instant::now(),
                first_byte: None,
                reader: None,
            }),
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request of this connection is being handled (its response included) until
    /// the guard drops: no idle or head deadline meanwhile.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Bytes arrived: between requests they start the next head's clock.
    fn note_bytes(&self) {
        if self.busy.load(Ordering::SeqCst) == 0 {
            let mut idle = self.lock_idle();
            idle.first_byte.get_or_insert_with(Instant::now);
        }
    }

    /// Bytes went out: between requests, a response still being written is activity.
    fn note_written(&self) {
        if self.busy.load(Ordering::SeqCst) == 0 {
            let mut idle = self.lock_idle();
            if idle.first_byte.is_none() {
                idle.since = Instant::now();
            }
        }
    }

    /// When the connection is to be closed unless a request begins, for a reader or
    /// writer that waits (whose waker is kept, to be woken when that changes).
    fn deadline(&self, timeouts: &ConnTimeouts, waker: &Waker) -> Option<Instant> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let mut idle = self.lock_idle();
        idle.reader = Some(waker.clone());
        Some(match idle.first_byte {
            Some(first) => first + timeouts.head,
            None => idle.since + timeouts.keep_alive,
        })
    }

    fn mark_gone(&self) {
        self.gone
            .send_if_modified(|gone| !std::mem::replace(gone, true));
    }

    /// Whether the client closed the connection (or it failed).
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Resolves when the client closes the connection (or it fails).
    pub async fn gone(&self) {
        let mut rx = self.gone.subscribe();
        // The sender lives as long as `self`, so this only ends when the flag is set.
        let _ = rx.wait_for(|gone| *gone).await;
    }
}

/// How long `request`'s body may take to arrive (its server's [`ConnTimeouts::body`]).
pub fn body_timeout(request: &poem::Request) -> Duration {
    request
        .data::<Arc<super::AppState>>()
        .map_or(ConnTimeouts::default().body, |s| {
            s.connections.timeouts.body
        })
}

/// The open connections by peer address, and their timeouts.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<SocketAddr, Arc<Connection>>>,
    timeouts: ConnTimeouts,
}

impl Connections {
    /// No connections yet, closed after `timeouts`.
    pub fn new(timeouts: ConnTimeouts) -> Self {
        Self {
            open: Mutex::default(),
            timeouts,
        }
    }

    /// The timeouts connections are held to.
    pub fn timeouts(&self) -> &ConnTimeouts {
        &self.timeouts
    }

    /// The open connection from `peer`, if it is tracked.
    pub fn get(&self, peer: &RemoteAddr) -> Option<Arc<Connection>> {
        let addr = peer.as_socket_addr()?;
        self.lock().get(addr).cloned()
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A TCP acceptor whose streams report their client's EOF to [`Connections`].
#[derive(Debug)]
pub struct TrackingAcceptor {
    listener: TcpListener,
    local: SocketAddr,
    connections: Arc<Connections>,
}

impl TrackingAcceptor {
    /// Wraps a bound listener.
    pub fn new(listener: TcpListener, connections: Arc<Connections>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            listener,
            local,
            connections,
        })
    }
}

impl Acceptor for TrackingAcceptor {
    type Io = TrackedStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        vec![LocalAddr(self.local.into())]
    }

    async fn accept(&mut self) -> io::Result<(TrackedStream, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, peer) = self.listener.accept().await?;
        let connection = Arc::new(Connection::new());
        self.connections.lock().insert(peer, connection.clone());
        let tracked = TrackedStream {
            inner: stream,
            connection,
            connections: self.connections.clone(),
            peer,
            timer: None,
        };
        Ok((
            tracked,
            LocalAddr(self.local.into()),
            RemoteAddr(peer.into()),
            Scheme::HTTP,
        ))
    }
}

/// A TCP stream that marks its [`Connection`] gone on EOF, on an I/O error and when
/// dropped, and fails its waiting reads and writes past the connection's deadline.
#[derive(Debug)]
pub struct TrackedStream {
    inner: TcpStream,
    connection: Arc<Connection>,
    connections: Arc<Connections>,
    peer: SocketAddr,
    timer: Option<Pin<Box<Sleep>>>,
}

impl TrackedStream {
    /// Books a write's outcome: a failure marks the client gone, progress restarts the
    /// write deadline, and a pending write fails once the deadline has passed.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match &result {
            Poll::Ready(Err(_)) => self.connection.mark_gone(),
            Poll::Pending => {
                if let Some(e) = self.check_deadline(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            Poll::Ready(Ok(n)) => {
                if *n > 0 {
                    self.connection.note_written();
                }
            }
        }
        result
    }

    /// For a read or write that is pending: an error once the connection's deadline has
    /// passed (the timer wakes the task then).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let deadline = self
            .connection
            .deadline(&self.connections.timeouts, cx.waker())?;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready().then(|| {
            self.connection.mark_gone();
            tracing::debug!(peer = %self.peer, "closing a connection that held the server idle");
            io::Error::new(io::ErrorKind::TimedOut, "connection idle or too slow")
        })
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.connection.mark_gone();
        let mut open = self.connections.lock();
        if open
            .get(&self.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.connection))
        {
            open.remove(&self.peer);
        }
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wants = buf.remaining() > 0;
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &result {
            Poll::Ready(Ok(())) if wants && buf.filled().len() == before => {
                self.connection.mark_gone()
            }
            Poll::Ready(Ok(())) => self.connection.note_bytes(),
            Poll::Ready(Err(_)) => self.connection.mark_gone(),
            Poll::Pending => {
                if let Some(e) = self.check_deadline(cx) {
                    return Poll::Ready(Err(e));
                }
            }
        }
        result
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, data);
        self.after_write(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
