import Dispatch
import Logging
import Synchronization

/// Folds repeated log lines that someone outside can trigger (a lookup of a
/// bad tree, a blob that fails its check, a remote that keeps failing), so
/// that no client can flood the log:
///
/// - the first line of a kind and key (a digest, say) in a window is logged;
///   later ones in that window are only counted, and when the window ends
///   one line says `… and 1,999 more in the last minute`;
/// - each kind logs at most `perKindLimit` distinct keys per window, and the
///   rest are counted the same way (`… and 12,345 more <kind> lines`), so
///   varying the key does not get round it either.
///
/// Memory is bounded by `maxKeys` keys per window (beyond it, lines are only
/// counted). Summaries are written by a timer, also when nothing else is
/// logged afterwards.
public final class LogFolder: @unchecked Sendable {  // `timer` is set once and only cancelled after
    public let logger: Logger
    public let window: Duration
    public let perKindLimit: Int
    public let maxKeys: Int

    private struct Key: Hashable {
        let kind: String
        let key: String
    }

    private struct Folded {
        var suppressed = 0
        var level: Logger.Level
        var sample: String
    }

    private struct KindState {
        var logged = 0
        var suppressed = 0
        var level: Logger.Level = .warning
    }

    private struct State {
        var windowStart: ContinuousClock.Instant
        var seen: [Key: Folded] = [:]
        var kinds: [String: KindState] = [:]
    }

    /// Distinct kinds counted apart in one window.
    public static let maxKinds = 256
    private let state: Mutex<State>
    private let timer: DispatchSourceTimer

    public init(logger: Logger, window: Duration = .seconds(60), perKindLimit: Int = 50, maxKeys: Int = 4096) {
        self.logger = logger
        self.window = window
        self.perKindLimit = max(1, perKindLimit)
        self.maxKeys = max(1, maxKeys)
        self.state = Mutex(State(windowStart: .now))
        let t = DispatchSource.makeTimerSource(queue: DispatchQueue.global(qos: .utility))
        timer = t
        let ms = max(10, Int(window.components.seconds * 1000 + window.components.attoseconds / 1_000_000_000_000_000))
        t.schedule(deadline: .now() + .milliseconds(ms), repeating: .milliseconds(ms))
        t.setEventHandler { [weak self] in self?.flush() }
        t.resume()
    }

    deinit { timer.cancel() }

    /// Logs `message` at `level` unless a line of this `kind` and `key` (or
    /// too many of this kind) was logged in the current window.
    public func log(_ level: Logger.Level, kind: String, key: String, _ message: @autoclosure () -> String) {
        let now = ContinuousClock.now
        var pending: [(Logger.Level, String)] = []
        let emit = state.withLock { s -> Bool in
            if now - s.windowStart >= window { pending = rollOver(&s, now: now) }
            let k = Key(kind: kind, key: key)
            if var f = s.seen[k] {
                f.suppressed += 1
                s.seen[k] = f
                return false
            }
            // Kinds are few and fixed; should a caller's kinds vary, those
            // beyond `maxKinds` in a window share one count.
            let counted = s.kinds[kind] != nil || s.kinds.count < Self.maxKinds ? kind : "other warnings"
            var ks = s.kinds[counted] ?? KindState(level: level)
            guard counted == kind, ks.logged < perKindLimit, s.seen.count < maxKeys else {
                ks.suppressed += 1
                s.kinds[counted] = ks
                return false
            }
            ks.logged += 1
            s.kinds[counted] = ks
            s.seen[k] = Folded(level: level, sample: key)
            return true
        }
        for (l, line) in pending { logger.log(level: l, "\(line)") }
        if emit { logger.log(level: level, "\(message())") }
    }

    public func warning(kind: String, key: String, _ message: @autoclosure () -> String) {
        log(.warning, kind: kind, key: key, message())
    }

    public func error(kind: String, key: String, _ message: @autoclosure () -> String) {
        log(.error, kind: kind, key: key, message())
    }

    /// Writes the summaries of a window that has ended.
    public func flush() {
        let now = ContinuousClock.now
        let lines = state.withLock { s -> [(Logger.Level, String)] in
            guard now - s.windowStart >= window else { return [] }
            return rollOver(&s, now: now)
        }
        for (l, line) in lines { logger.log(level: l, "\(line)") }
    }

    /// Lines left to say about the window that ended; starts a new one.
    private func rollOver(_ s: inout State, now: ContinuousClock.Instant) -> [(Logger.Level, String)] {
        var lines: [(Logger.Level, String)] = []
        let span = Self.describe(window)
        for (k, f) in s.seen where f.suppressed > 0 {
            lines.append((f.level, "\(k.kind) \(k.key): … and \(Self.count(f.suppressed)) more in the last \(span)"))
        }
        for (kind, ks) in s.kinds where ks.suppressed > 0 {
            lines.append((ks.level, "\(kind): … and \(Self.count(ks.suppressed)) more lines in the last \(span) (not shown)"))
        }
        lines.sort { $0.1 < $1.1 }
        s = State(windowStart: now)
        return lines
    }

    /// 1999 as `1,999`.
    static func count(_ n: Int) -> String {
        let digits = Array(String(n))
        var out = ""
        for (i, c) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
            out.append(c)
        }
        return out
    }

    static func describe(_ d: Duration) -> String {
        let s = d.components.seconds
        if s == 60 { return "minute" }
        if s > 0 && s % 60 == 0 { return "\(s / 60) minutes" }
        return s >= 1 ? "\(s) s" : "\(d)"
    }
}
