//! [`VerifyingReader`]: checks a stream against a descriptor's size and digest while it is read.
//!
//! Bytes pass through unchanged and are hashed on the way. Reading more bytes than expected fails
//! at once (a registry or file that sends too much is never trusted further); at end of stream a
//! short read or a digest mismatch fails the final `read` with [`VerifyError`] inside an
//! `io::Error` of kind `InvalidData`, so any consumer (`io::copy`, a tar reader, a decompressor)
//! sees the failure before it can treat the content as complete.
//!
//! With the `tokio` feature the same type also implements `tokio::io::AsyncRead`.

use std::io::{self, Read};

use crate::{Digest, DigestHasher};

/// A size or digest mismatch found while streaming content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(
        "content of {expected_digest} is larger than the expected {expected} bytes; hint: the source is corrupt or the descriptor's size is wrong"
    )]
    TooLong { expected_digest: Digest, expected: u64 },
    #[error(
        "content of {expected_digest} ended after {actual} bytes, expected {expected}; hint: the download or file was truncated, try again"
    )]
    TooShort { expected_digest: Digest, expected: u64, actual: u64 },
    #[error(
        "digest mismatch: expected {expected}, got {actual}; hint: the content is corrupt or was replaced at the source"
    )]
    DigestMismatch { expected: Digest, actual: Digest },
}

impl From<VerifyError> for io::Error {
    fn from(e: VerifyError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Extracts a [`VerifyError`] from an `io::Error` produced by a [`VerifyingReader`].
pub fn verify_error(e: &io::Error) -> Option<&VerifyError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<VerifyError>())
}

/// Wraps a reader and verifies size and digest as it is read (see the module docs).
pub struct VerifyingReader<R> {
    inner: R,
    expected_digest: Digest,
    expected_size: u64,
    hasher: Option<DigestHasher>,
    read: u64,
    /// Set once end of stream was reached: the verdict, repeated on every later read.
    outcome: Option<Result<(), VerifyError>>,
}

impl<R> VerifyingReader<R> {
    pub fn new(inner: R, expected_digest: Digest, expected_size: u64) -> VerifyingReader<R> {
        let hasher = Some(expected_digest.hasher());
        VerifyingReader { inner, expected_digest, expected_size, hasher, read: 0, outcome: None }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// True once the whole stream was read and matched.
    pub fn is_verified(&self) -> bool {
        matches!(self.outcome, Some(Ok(())))
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Accounts for `n` new bytes in `buf`; errors on overrun.
    fn consume(&mut self, buf: &[u8]) -> Result<(), VerifyError> {
        self.read += buf.len() as u64;
        if self.read > self.expected_size {
            return Err(VerifyError::TooLong {
                expected_digest: self.expected_digest.clone(),
                expected: self.expected_size,
            });
        }
        if let Some(h) = &mut self.hasher {
            h.update(buf);
        }
        Ok(())
    }

    /// Called when the inner reader reports end of stream.
    fn finish(&mut self) -> Result<(), VerifyError> {
        if let Some(outcome) = &self.outcome {
            return outcome.clone();
        }
        let outcome = if self.read != self.expected_size {
            Err(VerifyError::TooShort {
                expected_digest: self.expected_digest.clone(),
                expected: self.expected_size,
                actual: self.read,
            })
        } else {
            let hasher = self.hasher.take().unwrap_or_else(|| self.expected_digest.hasher());
            let actual = hasher.finish();
            if actual == self.expected_digest {
                Ok(())
            } else {
                Err(VerifyError::DigestMismatch { expected: self.expected_digest.clone(), actual })
            }
        };
        self.outcome = Some(outcome.clone());
        outcome
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.finish()?;
            return Ok(0);
        }
        self.consume(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(feature = "tokio")]
mod async_read {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, ReadBuf};

    use super::VerifyingReader;

    impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let new = &buf.filled()[before..];
                    if new.is_empty() {
                        return Poll::Ready(this.finish().map_err(Into::into));
                    }
                    // `consume` needs `&mut this` while `new` borrows `buf`, not `this`: fine.
                    Poll::Ready(this.consume(new).map_err(Into::into))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(r: impl Read) -> io::Result<Vec<u8>> {
        let mut r = r;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn passes_matching_content_through() {
        let data = b"hello layer".to_vec();
        let mut r = VerifyingReader::new(&data[..], Digest::sha256_of(&data), data.len() as u64);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert!(r.is_verified());
        assert_eq!(r.bytes_read(), data.len() as u64);
    }

    #[test]
    fn fails_on_digest_mismatch_at_eof() {
        let data = b"hello layer";
        let wrong = Digest::sha256_of(b"something else");
        let err = read_all(VerifyingReader::new(&data[..], wrong, data.len() as u64)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(verify_error(&err), Some(VerifyError::DigestMismatch { .. })), "{err}");
    }

    #[test]
    fn fails_on_short_and_long_content() {
        let data = b"0123456789";
        let d = Digest::sha256_of(data);
        let err = read_all(VerifyingReader::new(&data[..], d.clone(), 11)).unwrap_err();
        assert!(
            matches!(verify_error(&err), Some(VerifyError::TooShort { actual: 10, .. })),
            "{err}"
        );
        let err = read_all(VerifyingReader::new(&data[..], d, 4)).unwrap_err();
        assert!(matches!(verify_error(&err), Some(VerifyError::TooLong { .. })), "{err}");
        assert!(err.to_string().contains("larger than the expected 4 bytes"), "{err}");
    }

    #[test]
    fn verifies_sha512() {
        let data = b"sha512 content";
        let mut h = DigestHasher::new(crate::Algorithm::Sha512);
        h.update(data);
        let d = h.finish();
        assert_eq!(read_all(VerifyingReader::new(&data[..], d, 14)).unwrap(), data);
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn async_reader_verifies_too() {
        use tokio::io::AsyncReadExt;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let data = b"async content".to_vec();
            let mut ok = VerifyingReader::new(&data[..], Digest::sha256_of(&data), 13);
            let mut out = Vec::new();
            AsyncReadExt::read_to_end(&mut ok, &mut out).await.unwrap();
            assert_eq!(out, data);
            let mut bad = VerifyingReader::new(&data[..], Digest::sha256_of(b"x"), 13);
            let err = AsyncReadExt::read_to_end(&mut bad, &mut Vec::new()).await.unwrap_err();
            assert!(matches!(verify_error(&err), Some(VerifyError::DigestMismatch { .. })));
        });
    }
}
