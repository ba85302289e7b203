//! Unmasking: XOR a payload with its 4-byte masking key, optionally moving it down the buffer.
//!
//! The forwarder unmasks a payload and shifts it towards the start of the buffer in one pass
//! (the unmasked header is 4 bytes shorter than the masked one), so every routine here takes a
//! source and a destination offset inside one buffer with `dst <= src`. Copying forwards in
//! chunks that are read before they are written is safe for any such overlap: a chunk's stores
//! end at `dst + k + W <= src + k + W`, where the next chunk's loads begin.
//!
//! `phase` is how many payload bytes of the frame came before this piece (mod 4): payloads
//! stream across reads and the mask position carries over.
//!
//! [`scalar`] is the byte-at-a-time reference; [`words`] is portable 8-byte-word code; [`sse2`]
//! is x86_64's 16-byte vectors (SSE2 is part of the x86_64 baseline, so no runtime detection).
//! [`unmask_move`] picks the fastest one built for this target. All are tested against each
//! other.

/// The mask as it applies from this piece's first byte on.
#[inline]
fn rotated(mask: [u8; 4], phase: usize) -> [u8; 4] {
    let p = phase & 3;
    [mask[p], mask[(p + 1) & 3], mask[(p + 2) & 3], mask[(p + 3) & 3]]
}

#[inline]
fn check(buf: &[u8], src: usize, dst: usize, len: usize) {
    assert!(
        dst <= src && src.checked_add(len).is_some_and(|end| end <= buf.len()),
        "unmask out of bounds: src {src} dst {dst} len {len} buf {}",
        buf.len()
    );
}

/// Unmasks `buf[src..src + len]` into `buf[dst..dst + len]` with the fastest routine available.
#[inline]
pub fn unmask_move(buf: &mut [u8], src: usize, dst: usize, len: usize, mask: [u8; 4], phase: usize) {
    #[cfg(target_arch = "x86_64")]
    sse2(buf, src, dst, len, mask, phase);
    #[cfg(not(target_arch = "x86_64"))]
    words(buf, src, dst, len, mask, phase);
}

/// Unmasks `payload` in place; `phase` as in [`unmask_move`].
#[inline]
pub fn unmask(payload: &mut [u8], mask: [u8; 4], phase: usize) {
    let len = payload.len();
    unmask_move(payload, 0, 0, len, mask, phase);
}

/// Byte-at-a-time reference implementation.
pub fn scalar(buf: &mut [u8], src: usize, dst: usize, len: usize, mask: [u8; 4], phase: usize) {
    check(buf, src, dst, len);
    for k in 0..len {
        buf[dst + k] = buf[src + k] ^ mask[(phase + k) & 3];
    }
}

/// Portable version working on 8-byte words, four at a time.
pub fn words(buf: &mut [u8], src: usize, dst: usize, len: usize, mask: [u8; 4], phase: usize) {
    check(buf, src, dst, len);
    let m = rotated(mask, phase);
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let base = buf.as_mut_ptr();
    let mut k = 0;
    // SAFETY: `check` proved src + len and dst + len (dst <= src) lie inside `buf`; every access
    // below is at an offset k + i with k + i + 8 <= len. Unaligned reads and writes are used
    // throughout, and each group of words is read before any of it is written (see module doc).
    unsafe {
        let s = base.add(src);
        let d = base.add(dst);
        while k + 32 <= len {
            let a = (s.add(k) as *const u64).read_unaligned();
            let b = (s.add(k + 8) as *const u64).read_unaligned();
            let c = (s.add(k + 16) as *const u64).read_unaligned();
            let e = (s.add(k + 24) as *const u64).read_unaligned();
            (d.add(k) as *mut u64).write_unaligned(a ^ m64);
            (d.add(k + 8) as *mut u64).write_unaligned(b ^ m64);
            (d.add(k + 16) as *mut u64).write_unaligned(c ^ m64);
            (d.add(k + 24) as *mut u64).write_unaligned(e ^ m64);
            k += 32;
        }
        while k + 8 <= len {
            let a = (s.add(k) as *const u64).read_unaligned();
            (d.add(k) as *mut u64).write_unaligned(a ^ m64);
            k += 8;
        }
    }
    // k is a multiple of 4 here, so the rotated mask still lines up.
    for i in k..len {
        buf[dst + i] = buf[src + i] ^ m[i & 3];
    }
}

/// x86_64 version on 16-byte SSE2 vectors, four at a time.
#[cfg(target_arch = "x86_64")]
pub fn sse2(buf: &mut [u8], src: usize, dst: usize, len: usize, mask: [u8; 4], phase: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_set1_epi32, _mm_storeu_si128, _mm_xor_si128};
    check(buf, src, dst, len);
    let m = rotated(mask, phase);
    let base = buf.as_mut_ptr();
    let mut k = 0;
    // SAFETY: SSE2 is always present on x86_64. `check` proved src + len and dst + len (dst <=
    // src) lie inside `buf`; every access is at k + i with k + i + W <= len for its width W,
    // unaligned loads and stores throughout, and each group is loaded before any of it is stored.
    unsafe {
        let mv = _mm_set1_epi32(i32::from_ne_bytes(m));
        let s = base.add(src);
        let d = base.add(dst);
        while k + 64 <= len {
            let a = _mm_loadu_si128(s.add(k) as *const __m128i);
            let b = _mm_loadu_si128(s.add(k + 16) as *const __m128i);
            let c = _mm_loadu_si128(s.add(k + 32) as *const __m128i);
            let e = _mm_loadu_si128(s.add(k + 48) as *const __m128i);
            _mm_storeu_si128(d.add(k) as *mut __m128i, _mm_xor_si128(a, mv));
            _mm_storeu_si128(d.add(k + 16) as *mut __m128i, _mm_xor_si128(b, mv));
            _mm_storeu_si128(d.add(k + 32) as *mut __m128i, _mm_xor_si128(c, mv));
            _mm_storeu_si128(d.add(k + 48) as *mut __m128i, _mm_xor_si128(e, mv));
            k += 64;
        }
        while k + 16 <= len {
            let a = _mm_loadu_si128(s.add(k) as *const __m128i);
            _mm_storeu_si128(d.add(k) as *mut __m128i, _mm_xor_si128(a, mv));
            k += 16;
        }
        if k + 8 <= len {
            let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
            let a = (s.add(k) as *const u64).read_unaligned();
            (d.add(k) as *mut u64).write_unaligned(a ^ m64);
            k += 8;
        }
    }
    // k is a multiple of 4 here, so the rotated mask still lines up.
    for i in k..len {
        buf[dst + i] = buf[src + i] ^ m[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Routine = fn(&mut [u8], usize, usize, usize, [u8; 4], usize);

    fn routines() -> Vec<(&'static str, Routine)> {
        let mut v: Vec<(&'static str, Routine)> = vec![("words", words)];
        #[cfg(target_arch = "x86_64")]
        v.push(("sse2", sse2));
        v
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + 7) as u8).collect()
    }

    #[test]
    fn every_variant_matches_scalar_for_every_shift_length_and_phase() {
        let mask = [0x12, 0x9a, 0xfe, 0x01];
        for len in (0..300).chain([1000, 4095, 4096, 65_537]) {
            for shift in [0, 1, 3, 4, 7, 8, 13, 14, 17, 64] {
                for phase in 0..4 {
                    let mut want = pattern(len + shift + 3);
                    scalar(&mut want, shift + 3, 3, len, mask, phase);
                    for (name, f) in routines() {
                        let mut got = pattern(len + shift + 3);
                        f(&mut got, shift + 3, 3, len, mask, phase);
                        assert_eq!(got, want, "{name} len {len} shift {shift} phase {phase}");
                    }
                }
            }
        }
    }

    #[test]
    fn unmasking_twice_restores_the_input() {
        let orig = pattern(1001);
        let mut buf = orig.clone();
        unmask(&mut buf, [1, 2, 3, 4], 3);
        assert_ne!(buf, orig);
        unmask(&mut buf, [1, 2, 3, 4], 3);
        assert_eq!(buf, orig);
    }

    #[test]
    fn phase_carries_across_pieces() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let mut whole = pattern(777);
        unmask(&mut whole, mask, 0);
        let mut pieces = pattern(777);
        let mut at = 0;
        for piece in [1, 2, 5, 64, 100, 3, 602] {
            unmask(&mut pieces[at..at + piece], mask, at);
            at += piece;
        }
        assert_eq!(pieces, whole);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn rejects_a_destination_past_the_source() {
        let mut buf = [0u8; 16];
        words(&mut buf, 0, 4, 8, [0; 4], 0);
    }
}
