//! The stress scenario's data: sequence-numbered records both ways, and
//! the checkers that prove from them that no byte was lost, duplicated or
//! reordered beyond what the device contract allows
//! (`docs/device-spec.md`, "Several readers and writers"). The host's side
//! (`vdevlab_lab::stress`) uses the same functions.
//!
//! - Receive: the host injects record after record, 16 bytes each: the
//!   record's number `k` (u64, little-endian) and a check word
//!   `mix(seed ^ k)`. The host only ever injects whole records and the
//!   readers only ask for multiples of 16 bytes, and the driver hands
//!   out bytes in order from page-sized buffers the device filled from
//!   its FIFO, so every read returns whole records (a read that does not
//!   is reported).
//! - Transmit: each `write()` is one record of 16 to 4096 bytes: a
//!   16-byte header (`"QWtx"`, writer id u16, length u16, sequence number
//!   u32, check u32) and a payload derived from the header. Writes of up
//!   to one page are not interleaved (one tx buffer each), so the host
//!   finds whole records in its capture, and each writer's in order.

/// Bytes per receive record.
pub const RX_RECORD: usize = 16;
/// The transmit header's magic.
pub const TX_MAGIC: &[u8; 4] = b"QWtx";
/// Transmit header bytes.
pub const TX_HEADER: usize = 16;
/// Largest transmit record: one driver tx buffer (a page).
pub const TX_MAX: usize = 4096;

/// splitmix64's finalizer: a bijective 64-bit mix.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A small seeded generator (xorshift64* over a mixed seed).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and `stream` (different streams differ).
    pub fn new(seed: u64, stream: u64) -> Self {
        Self(mix(seed ^ mix(stream)) | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Receive record `k` of the stream of `seed`.
pub fn rx_record(seed: u64, k: u64) -> [u8; RX_RECORD] {
    let mut r = [0u8; RX_RECORD];
    r[..8].copy_from_slice(&k.to_le_bytes());
    r[8..].copy_from_slice(&mix(seed ^ k).to_le_bytes());
    r
}

/// Receive records `from..from + n`, back to back.
pub fn rx_records(seed: u64, from: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n as usize * RX_RECORD);
    for k in from..from + n {
        out.extend_from_slice(&rx_record(seed, k));
    }
    out
}

/// The first record number of `data`, which must be whole, valid,
/// consecutive receive records.
pub fn decode_rx(seed: u64, data: &[u8]) -> Result<u64, String> {
    if data.is_empty() || !data.len().is_multiple_of(RX_RECORD) {
        return Err(format!(
            "a read of {} bytes is not whole {RX_RECORD}-byte records",
            data.len()
        ));
    }
    let mut first = None;
    for (i, r) in data.chunks_exact(RX_RECORD).enumerate() {
        let k = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
        let check = u64::from_le_bytes(r[8..].try_into().unwrap_or_default());
        if check != mix(seed ^ k) {
            return Err(format!(
                "record {i} of a read is not a record of the stream (number {k:#x}, check {check:#x})"
            ));
        }
        let start = *first.get_or_insert(k);
        if k != start + i as u64 {
            return Err(format!(
                "a read holds record {k} after record {}: not one contiguous run",
                start + i as u64 - 1
            ));
        }
    }
    first.ok_or_else(|| "empty read".to_string())
}

/// What the receive checker concluded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxVerdict {
    /// Records read, by all readers together.
    pub read: u64,
    /// Records dropped by flushes (each flush matched to its gap).
    pub flushed: u64,
    /// Records the driver received but nobody read: at the end of the
    /// stream, dropped by the unbind.
    pub lost_at_unbind: u64,
}

/// Check the runs of records the readers got (`(first, count)`, any
/// order) against the driver's count of records received (`received`)
/// and the records each flush dropped (`flushes`, in the order they
/// ran; a single thread flushes): every record is read at most once;
/// between two runs, the records nobody read are exactly those of one or
/// more consecutive flushes; after the last run, the records left are the
/// remaining flushes' and then what the unbind dropped.
pub fn check_rx(
    runs: &mut [(u64, u64)],
    flushes: &[u64],
    received: u64,
) -> Result<RxVerdict, String> {
    runs.sort_unstable();
    let mut flush = flushes.iter().copied().filter(|&f| f > 0).peekable();
    let mut v = RxVerdict::default();
    let mut at = 0u64;
    for &(first, count) in runs.iter() {
        if first < at {
            return Err(format!(
                "records {first}..{} were read twice (another read ended at {at})",
                first + count
            ));
        }
        let mut gap = first - at;
        while gap > 0 {
            match flush.next() {
                Some(f) if f <= gap => {
                    gap -= f;
                    v.flushed += f;
                }
                Some(f) => {
                    return Err(format!(
                        "records {at}..{first} were not read, and the next flush dropped {f} records, not {gap}"
                    ))
                }
                None => {
                    return Err(format!(
                        "records {}..{first} were lost: not read, and no flush is left to explain them",
                        first - gap
                    ))
                }
            }
        }
        at = first + count;
        v.read += count;
    }
    if at > received {
        return Err(format!(
            "records were read up to {at}, but the driver received only {received}"
        ));
    }
    let mut tail = received - at;
    for f in flush {
        if f > tail {
            return Err(format!(
                "a flush dropped {f} records, more than the {tail} left unread at the end"
            ));
        }
        tail -= f;
        v.flushed += f;
    }
    v.lost_at_unbind = tail;
    Ok(v)
}

/// The length of transmit record `seq` of writer `writer`.
pub fn tx_len(seed: u64, writer: u16, seq: u32) -> usize {
    let r = mix(seed ^ (u64::from(writer) << 40) ^ u64::from(seq) ^ 0x7478);
    // Mostly small, sometimes a whole page.
    match r % 8 {
        0 => TX_MAX,
        1..=3 => TX_HEADER + (r >> 8) as usize % 64,
        _ => TX_HEADER + (r >> 8) as usize % (TX_MAX - TX_HEADER + 1),
    }
}

fn tx_check(seed: u64, writer: u16, seq: u32) -> u32 {
    mix(seed ^ (u64::from(writer) << 32) ^ u64::from(seq)) as u32
}

/// Transmit record `seq` of writer `writer`.
pub fn tx_record(seed: u64, writer: u16, seq: u32) -> Vec<u8> {
    let len = tx_len(seed, writer, seq);
    let check = tx_check(seed, writer, seq);
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(TX_MAGIC);
    r.extend_from_slice(&writer.to_le_bytes());
    r.extend_from_slice(&(len as u16).to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&check.to_le_bytes());
    for i in 0..len - TX_HEADER {
        r.push((check >> ((i % 4) * 8)) as u8 ^ i as u8);
    }
    r
}

/// What the transmit checker concluded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxVerdict {
    /// Records found in the capture.
    pub records: u64,
    /// Records written (the writers' count) that are not in the capture.
    pub missing: u64,
    /// Their bytes: exactly what the driver queued and the device never
    /// took (dropped by a reset or the unbind).
    pub missing_bytes: u64,
}

/// Check the host's capture against what the writers say they wrote
/// (`written[w]`: writer `w`'s `write()`s that succeeded, records `0..n`)
/// and the bytes the driver queued (`queued`): the capture is whole,
/// valid records; each writer's appear in order, none twice, none it did
/// not write; the bytes of the records missing are exactly `queued`
/// minus the capture's length (what resets and the unbind dropped).
pub fn check_tx(
    seed: u64,
    captured: &[u8],
    written: &[u64],
    queued: u64,
) -> Result<TxVerdict, String> {
    let mut next = vec![0u64; written.len()];
    let mut v = TxVerdict::default();
    let mut at = 0usize;
    while at < captured.len() {
        let rest = &captured[at..];
        if rest.len() < TX_HEADER || &rest[..4] != TX_MAGIC {
            return Err(format!("no record header at capture byte {at}"));
        }
        let writer = u16::from_le_bytes([rest[4], rest[5]]);
        let len = usize::from(u16::from_le_bytes([rest[6], rest[7]]));
        let seq = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default());
        let w = usize::from(writer);
        if w >= written.len() {
            return Err(format!(
                "capture byte {at}: a record of unknown writer {writer}"
            ));
        }
        if len > rest.len() {
            return Err(format!(
                "capture byte {at}: record of {len} bytes cut short"
            ));
        }
        if rest[..len] != tx_record(seed, writer, seq)[..] {
            return Err(format!(
                "capture byte {at}: writer {writer}'s record {seq} ({len} bytes) is torn or corrupt"
            ));
        }
        let seq = u64::from(seq);
        if seq < next[w] {
            return Err(format!(
                "capture byte {at}: writer {writer}'s record {seq} after its record {} (twice, or out of order)",
                next[w] - 1
            ));
        }
        if seq >= written[w] {
            return Err(format!(
                "capture byte {at}: writer {writer}'s record {seq}, but it wrote only {}",
                written[w]
            ));
        }
        for s in next[w]..seq {
            v.missing += 1;
            v.missing_bytes += tx_len(seed, writer, s as u32) as u64;
        }
        next[w] = seq + 1;
        v.records += 1;
        at += len;
    }
    for (w, (&n, &got)) in written.iter().zip(&next).enumerate() {
        for s in got..n {
            v.missing += 1;
            v.missing_bytes += tx_len(seed, w as u16, s as u32) as u64;
        }
    }
    let dropped = queued.checked_sub(captured.len() as u64).ok_or_else(|| {
        format!(
            "the capture holds {} bytes, more than the {queued} the driver queued",
            captured.len()
        )
    })?;
    if v.missing_bytes != dropped {
        return Err(format!(
            "{} records ({} bytes) written are missing from the capture, but the driver \
             queued {queued} bytes and the device took {}: {dropped} bytes dropped",
            v.missing,
            v.missing_bytes,
            captured.len()
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_records_decode_and_runs_check() {
        let data = rx_records(7, 10, 3);
        assert_eq!(decode_rx(7, &data), Ok(10));
        assert!(decode_rx(8, &data).is_err(), "another seed's stream");
        assert!(decode_rx(7, &data[..20]).is_err(), "not whole records");
        let mut gap = data[..16].to_vec();
        gap.extend_from_slice(&data[32..]);
        assert!(decode_rx(7, &gap).is_err(), "not contiguous");

        // 0..4 read, 4..6 flushed, 6..9 read, 9..10 and 10..12 flushed
        // at once, 12..15 read, then 15..20 unread: 2 flushed, 3 lost.
        let mut runs = vec![(12, 3), (0, 4), (6, 3)];
        let v = check_rx(&mut runs, &[2, 0, 1, 2, 2], 20).unwrap();
        assert_eq!(
            v,
            RxVerdict {
                read: 10,
                flushed: 7,
                lost_at_unbind: 3
            }
        );
        assert!(check_rx(&mut [(0, 4), (3, 2)], &[], 10).is_err(), "twice");
        assert!(check_rx(&mut [(0, 4), (6, 2)], &[], 10).is_err(), "lost");
        assert!(
            check_rx(&mut [(0, 4), (6, 2)], &[3], 10).is_err(),
            "wrong flush"
        );
        assert!(check_rx(&mut [(0, 4)], &[], 3).is_err(), "beyond");
        assert!(check_rx(&mut [(0, 4)], &[7], 10).is_err(), "flush too big");
    }

    #[test]
    fn tx_records_check() {
        let mut cap = Vec::new();
        for (w, s) in [(0u16, 0u32), (1, 0), (0, 1), (1, 2), (0, 2)] {
            cap.extend(tx_record(3, w, s));
        }
        let lost = (tx_len(3, 1, 1) + tx_len(3, 1, 3)) as u64;
        let queued = cap.len() as u64 + lost;
        let v = check_tx(3, &cap, &[3, 4], queued).unwrap();
        assert_eq!((v.records, v.missing, v.missing_bytes), (5, 2, lost));
        assert!(
            check_tx(3, &cap, &[3, 4], queued + 1).is_err(),
            "unaccounted"
        );
        assert!(check_tx(3, &cap, &[3, 2], queued).is_err(), "not written");
        let mut torn = cap.clone();
        torn[20] ^= 1;
        assert!(check_tx(3, &torn, &[3, 4], queued).is_err());
        let mut twice = cap.clone();
        twice.extend(tx_record(3, 0, 1));
        assert!(check_tx(3, &twice, &[3, 4], queued + 100_000).is_err());
        for s in 0..200 {
            let l = tx_len(9, 2, s);
            assert!((TX_HEADER..=TX_MAX).contains(&l));
        }
    }
}
