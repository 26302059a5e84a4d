//! The agent's Unix socket: accepting connections within bounds, the
//! handshake, the access rule of each request (`access`), and dispatch to
//! one handler per request (`handlers`, `attach`).
//!
//! Nothing a peer sends can make the agent wait or allocate without bound:
//! a connection has `OPEN_TIMEOUT` for its handshake and first request,
//! frames are capped (`MAX_HELLO`, `MAX_REQUEST`, or the full `MAX_FRAME`
//! for root and for a user with a job that waits for its attach), and
//! connections in progress (until their reply is written) and the bytes of
//! replies being written are bounded per uid (`connlimit`).

use crate::socket::access::{self, Peer};
use crate::socket::conn::{
    encode, refuse, reply, write_frame, MAX_HELLO, MAX_REQUEST, OPEN_TIMEOUT,
};
use crate::socket::connlimit::{ConnLimits, Permit};
use crate::spawning::joblog::escape;
use crate::supervision::agent::Agent;
use crate::system::wire::UserConn;
use crate::{socket::attach, socket::handlers, system::wire};
use dask_spank_common::frame::MAX_FRAME;
use dask_spank_common::messages::Hello;
use dask_spank_common::{Opening, Response, OLDEST_PEER_VERSION, PROTOCOL_VERSION};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    let limits = Arc::new(ConnLimits::default());
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = agent.shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // EMFILE and friends: do not spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let peer = Peer {
            uid: cred.uid(),
            pid: cred.pid().unwrap_or(0),
        };
        match limits.try_acquire(peer.uid) {
            Ok(permit) => {
                let agent2 = agent.clone();
                agent.tasks.spawn(async move {
                    if let Err(e) = handle(stream, peer, permit, agent2).await {
                        tracing::debug!("connection of {peer} ended: {}", escape(&e));
                    }
                });
            }
            Err(why) => {
                agent.metrics.connections_refused.fetch_add(1, Relaxed);
                tracing::warn!("refused a connection: {why}");
                // Best effort, never waiting: the socket buffer of a new
                // connection is empty.
                if let Ok(frame) =
                    dask_spank_common::frame::encode(&Response::Error { message: why })
                {
                    let _ = stream.try_write(&frame);
                }
                // Whatever it queued goes off the loop (see `wire`).
                drop(wire::UserConn::new(stream, peer.uid));
            }
        }
    }
}

/// Handshake, then the first request, capped by who the peer is.
async fn open(s: &mut UnixStream, peer: &Peer, agent: &Agent) -> Result<Opening, String> {
    let hello: Hello = wire::read(s, peer.uid, MAX_HELLO)
        .await
        .map_err(|e| format!("bad handshake from {peer}: {e}"))?;
    if !(OLDEST_PEER_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
        return Err(format!(
            "protocol version {} is not supported (this agent speaks versions {OLDEST_PEER_VERSION} to {PROTOCOL_VERSION}); install matching dask-spank versions",
            hello.version
        ));
    }
    // The version of this connection: the peer's (an older peer, a job
    // that started before an upgrade, is served in its own).
    reply(
        s,
        &Response::Welcome {
            version: hello.version,
        },
    )
    .await?;
    let max = if peer.uid == 0 || agent.jobs.awaits_attach(peer.uid) {
        MAX_FRAME
    } else {
        MAX_REQUEST
    };
    wire::read(s, peer.uid, max)
        .await
        .map_err(|e| format!("bad request from {peer}: {e}"))
}

pub async fn handle(
    s: UnixStream,
    peer: Peer,
    permit: Permit,
    agent: Arc<Agent>,
) -> Result<(), String> {
    // Closed off the event loop whatever the path out (see `wire`).
    let mut s = UserConn::new(s, peer.uid);
    let opened = tokio::select! {
        r = tokio::time::timeout(OPEN_TIMEOUT, open(&mut s, &peer, &agent)) => r,
        _ = agent.shutdown.cancelled() => return Ok(()),
    };
    let req = match opened {
        Ok(Ok(req)) => req,
        Ok(Err(msg)) => return refuse(&mut s, msg).await,
        Err(_) => {
            return Err(format!(
                "no request from {peer} within {}s",
                OPEN_TIMEOUT.as_secs()
            ))
        }
    };
    if let Err(msg) = access::check(&req, &peer) {
        return refuse(&mut s, msg).await;
    }
    match req {
        Opening::Attach(a) => Box::pin(attach::run(s, agent, a, peer, permit)).await,
        Opening::Request(other) => {
            // The connection counts against its uid until its reply is
            // written or its deadline passed: a peer that does not read
            // holds one of its uid's few, not a reply the agent keeps for it.
            let answered = match handlers::handle(other, &peer, &agent) {
                Ok(r) => answer(&mut s, &r, &permit).await,
                Err(msg) => refuse(&mut s, msg).await,
            };
            drop(permit);
            answered
        }
    }
}

/// Write reply `r` if its bytes fit in what its uid may have in flight
/// (`connlimit`); refuse otherwise.
async fn answer(s: &mut UnixStream, r: &Response, permit: &Permit) -> Result<(), String> {
    let frame = encode(r)?;
    match permit.reserve_reply(frame.len()) {
        Ok(_held) => write_frame(s, &frame).await,
        Err(why) => {
            drop(frame);
            refuse(s, why).await
        }
    }
}
