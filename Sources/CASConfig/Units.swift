import Foundation

/// Parses a byte size: plain bytes, or a number with K, M, G, T (binary units,
/// as BuildGrid's configuration reads them), optionally followed by `B` or `iB`:
/// `512M`, `2GB`, `1GiB`, `4096`. Fractions are allowed with a unit (`1.5G`).
public func parseByteSize(_ text: String) -> Int64? {
    var s = text.trimmingCharacters(in: .whitespaces).lowercased()
    if s.hasSuffix("ib") { s.removeLast(2); guard s.last.map({ "kmgt".contains($0) }) == true else { return nil } }
    else if s.hasSuffix("b") { s.removeLast() }
    let units: [Character: Double] = ["k": 0x1p10, "m": 0x1p20, "g": 0x1p30, "t": 0x1p40]
    var multiplier = 1.0
    if let u = s.last, let m = units[u] {
        multiplier = m
        s.removeLast()
    }
    guard !s.isEmpty, s.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }) else { return nil }
    if multiplier == 1 { return Int64(s).flatMap { $0 < maxByteSize ? $0 : nil } }
    guard let v = Double(s), v >= 0, v * multiplier < Double(maxByteSize) else { return nil }
    return Int64(v * multiplier)
}

/// Parses a scrub rate: a number of MiB per second (`50`, `0.5`), or a
/// size per second with a unit (`50M`, `1G`). 0 means no bound. Returns
/// bytes per second.
public func parseRate(_ text: String) -> Int64? {
    let s = text.trimmingCharacters(in: .whitespaces)
    if let last = s.lowercased().last, "kmgtb".contains(last) { return parseByteSize(s) }
    guard !s.isEmpty, s.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }), let v = Double(s),
          v.isFinite, v >= 0, v * 0x1p20 < Double(maxByteSize) else { return nil }
    return Int64(v * 0x1p20)
}

/// The largest size a configuration may give (4 EiB): sums of a few such
/// sizes still fit in 64 bits.
public let maxByteSize: Int64 = 1 << 62

/// The longest duration a configuration may give (about 30 years).
public let maxDuration: Double = 1e9

/// Parses a duration: plain seconds, or a number with `s`, `m`, `h` or `d`
/// (`90s`, `15m`, `2h`, `7d`, `0.5s`). Returns seconds.
public func parseDuration(_ text: String) -> Double? {
    var s = text.trimmingCharacters(in: .whitespaces).lowercased()
    let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
    var multiplier = 1.0
    if let u = s.last, let m = units[u] {
        multiplier = m
        s.removeLast()
    }
    guard !s.isEmpty, s.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }), let v = Double(s) else { return nil }
    let seconds = v * multiplier
    return seconds.isFinite && seconds <= maxDuration ? seconds : nil
}
