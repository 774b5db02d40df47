//! Request bodies with a size cap that the host can observe.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use wasmtime_wasi_http::Error;

/// Set when a [`LimitedBody`] cut a body off, so the host can answer 413
/// whatever the guest made of the truncated stream.
#[derive(Clone, Default)]
pub struct BodyLimitFlag(Arc<AtomicBool>);

impl BodyLimitFlag {
    pub fn exceeded(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Wraps a body; after `limit` bytes it yields an error instead of data.
pub struct LimitedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    flag: BodyLimitFlag,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64) -> (Self, BodyLimitFlag) {
        let flag = BodyLimitFlag::default();
        (
            LimitedBody {
                inner,
                remaining: limit,
                limit,
                flag: flag.clone(),
            },
            flag,
        )
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.flag.0.store(true, Ordering::Relaxed);
                        this.remaining = 0;
                        return Poll::Ready(Some(Err(Error::HttpRequestBodySize(Some(
                            this.limit,
                        )))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
