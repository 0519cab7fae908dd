//! Config-space helpers: little-endian fields and windowed reads.
//!
//! A device renders its whole config space as bytes
//! ([`crate::VirtioDevice::config_space`]); the core serves the driver's
//! reads as windows of it ([`window`]).

/// Largest window a config read returns.
pub const MAX_READ: usize = 4096;

/// Bytes `offset..offset+size` of `space`; bytes past the end read as zero
/// (a frontend may ask for a larger window than the layout), and at most
/// [`MAX_READ`] bytes are returned.
pub fn window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; (size as usize).min(MAX_READ)];
    let start = offset as usize;
    if start < space.len() {
        let n = out.len().min(space.len() - start);
        out[..n].copy_from_slice(&space[start..start + n]);
    }
    out
}

/// A config space laid out as consecutive little-endian u32 words.
pub fn le_words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Store `value` little-endian at `offset` (ignored if it does not fit).
pub fn put_u32(space: &mut [u8], offset: usize, value: u32) {
    if let Some(b) = space.get_mut(offset..offset + 4) {
        b.copy_from_slice(&value.to_le_bytes());
    }
}

/// One 32-bit field of a device's config layout, for tools that show a
/// config space by name (`vdevlab device ... config`): each device declares
/// its layout once, next to the code that renders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset of the little-endian u32.
    pub offset: usize,
    /// The field's name, as the device's contract calls it.
    pub name: &'static str,
    /// Names of its bits, for a flags field (empty otherwise).
    pub bits: &'static [(u32, &'static str)],
}

impl Field {
    /// A plain numeric field.
    pub const fn word(offset: usize, name: &'static str) -> Field {
        Field {
            offset,
            name,
            bits: &[],
        }
    }
}

/// One line per field of `layout` found in `space`: offset, name, value in
/// hex and decimal, and the set bits by name for a flags field or the text
/// for a field named `magic`. Bytes past the layout are listed as raw
/// words (`word_0x..`), so nothing the device returns is hidden.
pub fn describe(space: &[u8], layout: &[Field]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut end = 0;
    for f in layout {
        let Some(v) = get_u32(space, f.offset) else {
            continue;
        };
        end = end.max(f.offset + 4);
        let note = if f.name == "magic" {
            format!("  {:?}", String::from_utf8_lossy(&v.to_le_bytes()))
        } else if !f.bits.is_empty() {
            let set: Vec<&str> = f
                .bits
                .iter()
                .filter(|(bit, _)| v & bit != 0)
                .map(|(_, n)| *n)
                .collect();
            format!("  {}", set.join("|"))
        } else {
            String::new()
        };
        lines.push(format!(
            "0x{:02x} {:<17} {v:#010x} ({v}){note}",
            f.offset, f.name
        ));
    }
    let mut off = end;
    while let Some(v) = get_u32(space, off) {
        lines.push(format!(
            "0x{off:02x} {:<17} {v:#010x} ({v})",
            format!("word_0x{off:02x}")
        ));
        off += 4;
    }
    lines
}

/// The little-endian u32 at `offset`, if the bytes are there.
pub fn get_u32(space: &[u8], offset: usize) -> Option<u32> {
    space
        .get(offset..offset + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// `v` saturated to u32 (for counters shown in a 32-bit field).
pub fn sat_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The little-endian u32 a driver wrote: `data` written at `offset`, if it
/// is exactly one aligned word at `field`.
pub fn written_u32(offset: u32, data: &[u8], field: u32) -> Option<u32> {
    (offset == field && data.len() == 4)
        .then(|| get_u32(data, 0))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_fields_bits_and_the_rest() {
        const LAYOUT: &[Field] = &[
            Field::word(0, "magic"),
            Field {
                offset: 4,
                name: "status",
                bits: &[(1, "A"), (2, "B"), (4, "C")],
            },
        ];
        let space = le_words(&[u32::from_le_bytes(*b"ABCD"), 5, 7]);
        let lines = describe(&space, LAYOUT);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].starts_with("0x00 magic") && lines[0].ends_with("\"ABCD\""));
        assert!(lines[1].starts_with("0x04 status") && lines[1].ends_with("A|C"));
        assert!(lines[2].starts_with("0x08 word_0x08") && lines[2].contains("(7)"));
    }

    #[test]
    fn windows_are_bounded_and_zero_padded() {
        let space = le_words(&[1, 2]);
        assert_eq!(window(&space, 0, 4), [1, 0, 0, 0]);
        assert_eq!(window(&space, 6, 4), [0, 0, 0, 0]);
        assert_eq!(window(&space, 1000, 8), vec![0; 8]);
        assert_eq!(window(&space, 0, u32::MAX).len(), MAX_READ);
        let mut s = space.clone();
        put_u32(&mut s, 4, 7);
        put_u32(&mut s, 6, 9); // does not fit: ignored
        assert_eq!(get_u32(&s, 4), Some(7));
        assert_eq!(written_u32(4, &8u32.to_le_bytes(), 4), Some(8));
        assert_eq!(written_u32(4, &[1, 2], 4), None);
        assert_eq!(sat_u32(u64::MAX), u32::MAX);
    }
}
