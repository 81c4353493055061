/// Arithmetic on values that come from outside (names, REAPI messages, Redis
/// replies, kernel requests): never traps, saturates at the type's bounds.
extension Int64 {
    /// `self + other`, clamped to `Int64.min...Int64.max`.
    @inlinable public func saturatingAdd(_ other: Int64) -> Int64 {
        let (r, o) = addingReportingOverflow(other)
        return o ? (other > 0 ? .max : .min) : r
    }

    /// `self - other`, clamped to `Int64.min...Int64.max`.
    @inlinable public func saturatingSubtract(_ other: Int64) -> Int64 {
        let (r, o) = subtractingReportingOverflow(other)
        return o ? (other < 0 ? .max : .min) : r
    }

    /// `self + other`, or nil when it does not fit.
    @inlinable public func checkedAdd(_ other: Int64) -> Int64? {
        let (r, o) = addingReportingOverflow(other)
        return o ? nil : r
    }

    /// The number of `unit`-sized blocks that hold `self` bytes (rounded up);
    /// 0 for a negative value. `unit` must be positive.
    @inlinable public func blocks(of unit: Int64) -> Int64 {
        guard self > 0 else { return 0 }
        return self / unit + (self % unit == 0 ? 0 : 1)
    }
}

extension Sequence where Element == Int64 {
    /// The sum, clamped to `Int64.min...Int64.max` instead of trapping.
    @inlinable public func saturatingSum() -> Int64 {
        reduce(0) { $0.saturatingAdd($1) }
    }
}
