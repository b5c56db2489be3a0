//! The erasure-coding profile of a blade: k data cells, m parity cells, and w extra shards that
//! must acknowledge a write beyond k.

use crate::cell::CELL_PAYLOAD_BYTES;
use crate::error::{KelpError, Result};

/// Shards in a stipe at most (k + m).
pub const SHARDS_MAX: usize = 64;

/// k + m + w of a blade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Data cells per stipe.
    pub k: u8,
    /// Parity cells per stipe.
    pub m: u8,
    /// Shards beyond k that must acknowledge a write (write quorum k + w).
    pub w: u8,
}

impl Default for Profile {
    fn default() -> Self {
        Profile { k: 8, m: 8, w: 4 }
    }
}

impl Profile {
    /// A checked profile: k, m >= 1, k + m <= 64, w <= m, and 2w >= m so that any k + w shards
    /// that wrote and any k + w shards that synced share at least k shards.
    pub fn new(k: u8, m: u8, w: u8) -> Result<Self> {
        let n = k as usize + m as usize;
        if k == 0 || m == 0 || n > SHARDS_MAX {
            return Err(KelpError::invalid(format!(
                "erasure profile {k}+{m}: need k >= 1, m >= 1 and k + m <= {SHARDS_MAX}"
            )));
        }
        if w > m || 2 * (w as usize) < m as usize {
            return Err(KelpError::invalid(format!(
                "erasure profile {k}+{m} with w={w}: need m/2 <= w <= m"
            )));
        }
        Ok(Profile { k, m, w })
    }

    /// Parses "K+M" (w defaults to ceil(m/2)) or "K+M+W".
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('+').collect();
        let num = |p: &str| {
            p.trim().parse::<u8>().map_err(|_| {
                KelpError::invalid(format!("erasure profile {s:?}: expected K+M or K+M+W"))
            })
        };
        match parts.as_slice() {
            [k, m] => {
                let m = num(m)?;
                Profile::new(num(k)?, m, m.div_ceil(2))
            }
            [k, m, w] => Profile::new(num(k)?, num(m)?, num(w)?),
            _ => Err(KelpError::invalid(format!(
                "erasure profile {s:?}: expected K+M or K+M+W"
            ))),
        }
    }

    /// Shards per stipe.
    pub fn n(self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Data cells per stipe.
    pub fn data(self) -> usize {
        self.k as usize
    }

    /// Shard acknowledgements a write or sync needs.
    pub fn quorum(self) -> usize {
        self.k as usize + self.w as usize
    }

    /// Payload bytes per stipe (k * 4080).
    pub fn stipe_payload_bytes(self) -> usize {
        self.k as usize * CELL_PAYLOAD_BYTES
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}+{}", self.k, self.m, self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_checked() {
        assert!(Profile::new(8, 8, 4).is_ok());
        assert!(Profile::new(0, 8, 4).is_err());
        assert!(Profile::new(8, 0, 0).is_err());
        assert!(Profile::new(40, 25, 13).is_err());
        assert!(Profile::new(8, 8, 9).is_err());
        assert!(Profile::new(8, 8, 2).is_err());
        assert_eq!(Profile::parse("4+2").unwrap(), Profile { k: 4, m: 2, w: 1 });
        assert_eq!(Profile::parse("8+8+5").unwrap().quorum(), 13);
        assert!(Profile::parse("8").is_err());
        assert!(Profile::parse("a+b").is_err());
    }
}
