//! Request headers as the host hands them over: the proxy-wasm map encoding, kept as
//! bytes. Clients send any bytes, so nothing here assumes UTF-8, and a map that does not
//! decode is `None`, never a panic.

/// Every header of a request, names as the host gives them (lower-case), values raw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Headers {
    /// Headers from name/value pairs (tests and the host layer).
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Self {
        Headers {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec()))
                .collect(),
        }
    }

    /// Decodes the map encoding: a little-endian `u32` count, then a `u32` name length and
    /// value length per pair, then each name and value followed by a NUL byte.
    pub fn decode(bytes: &[u8]) -> Option<Headers> {
        if bytes.is_empty() {
            return Some(Headers::default());
        }
        let word = |at: usize| -> Option<usize> {
            let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(b)).ok()
        };
        let count = word(0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        if data > bytes.len() {
            return None;
        }
        let mut take = |len: usize| -> Option<Vec<u8>> {
            let end = data.checked_add(len)?;
            let value = bytes.get(data..end)?.to_vec();
            (bytes.get(end) == Some(&0)).then_some(())?;
            data = end + 1;
            Some(value)
        };
        let mut pairs = Vec::with_capacity(count);
        for n in 0..count {
            let (name_len, value_len) = (word(4 + n * 8)?, word(8 + n * 8)?);
            let name = take(name_len)?;
            let value = take(value_len)?;
            pairs.push((name, value));
        }
        Some(Headers { pairs })
    }

    /// The values of `name`, in order (names compared ASCII case-insensitively).
    pub fn values<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` when it is UTF-8; `None` when absent or not UTF-8.
    pub fn text(&self, name: &str) -> Option<&str> {
        let (_, value) = self
            .pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))?;
        std::str::from_utf8(value).ok()
    }

    /// Every pair, in the host's order.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// These headers less every value of `names`.
    pub fn without(&self, names: &[&str]) -> Headers {
        let pairs = self
            .pairs
            .iter()
            .filter(|(k, _)| !names.iter().any(|n| k.eq_ignore_ascii_case(n.as_bytes())))
            .cloned()
            .collect();
        Headers { pairs }
    }
}

/// Encodes pairs in the map encoding (gRPC initial metadata, local-response headers).
pub fn encode<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&len(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.as_ref().len()));
        out.extend_from_slice(&len(v.as_ref().len()));
    }
    for (k, v) in pairs {
        for part in [k.as_ref(), v.as_ref()] {
            out.extend_from_slice(part);
            out.push(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    #[wasm_bindgen_test(unsupported = test)]
    fn the_map_encoding_round_trips_any_bytes() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b":authority", b"mgmt.example.com"),
            (b"x-note", b"caf\xe9"),
            (b"empty", b""),
        ];
        let headers = Headers::decode(&encode(&pairs)).unwrap();
        assert_eq!(headers, Headers::from_pairs(&pairs));
        assert_eq!(headers.text(":authority"), Some("mgmt.example.com"));
        assert_eq!(headers.text("x-note"), None, "not UTF-8");
        assert_eq!(headers.values("X-Note").next(), Some(&b"caf\xe9"[..]));
        assert!(headers.contains("empty") && !headers.contains("absent"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn an_empty_buffer_is_no_headers() {
        assert_eq!(Headers::decode(b""), Some(Headers::default()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_torn_or_lying_map_is_none() {
        let good = encode(&[("a", "b"), ("c", "d")]);
        for cut in 1..good.len() {
            assert_eq!(Headers::decode(&good[..cut]), None, "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::decode(&huge), None);
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(Headers::decode(&no_nul), None);
        let mut long_name = good;
        long_name[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Headers::decode(&long_name), None);
    }
}
