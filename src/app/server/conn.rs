//! Knowing when a client went away. hyper notices a peer's EOF while a request is in
//! flight, but poem keeps driving the request's handler to completion, so a handler
//! waiting for the worker would never learn that nobody listens. This acceptor wraps
//! each TCP stream to record that EOF, and handlers look their connection up by the
//! peer address (unique among open connections).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One open connection: whether its client has gone.
#[derive(Debug)]
pub struct Connection {
    gone: watch::Sender<bool>,
}

impl Connection {
    fn new() -> Self {
        Self {
            gone: watch::Sender::new(false),
        }
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

/// The open connections by peer address.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<SocketAddr, Arc<Connection>>>,
}

impl Connections {
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
/// dropped.
#[derive(Debug)]
pub struct TrackedStream {
    inner: TcpStream,
    connection: Arc<Connection>,
    connections: Arc<Connections>,
    peer: SocketAddr,
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
            Poll::Ready(Err(_)) => self.connection.mark_gone(),
            _ => {}
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
        if matches!(result, Poll::Ready(Err(_))) {
            self.connection.mark_gone();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Err(_))) {
            self.connection.mark_gone();
        }
        result
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
