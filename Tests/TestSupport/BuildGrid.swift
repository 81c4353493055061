import Foundation

/// A Python 3.12 virtual environment with BuildGrid installed, for interop
/// tests. Found at `$CASFS_BUILDGRID_VENV`, else `<package>/.build-venv/buildgrid`;
/// created with `scripts/setup-buildgrid-venv` when BuildGrid is not there.
public final class BuildGridVenv: Sendable {
    public let directory: String
    public var python: String { directory + "/bin/python" }

    /// The package root, found from this file's path.
    public static let packageRoot: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().path
    }()

    private static let shared = SharedVenv()

    /// The venv, set up once per test process. Throws when it cannot be set up.
    public static func get() throws -> BuildGridVenv {
        try shared.get()
    }

    init(directory: String) { self.directory = directory }

    /// Result of running a Python program.
    public struct Output: Sendable {
        public let status: Int32
        public let stdout: String
        public let stderr: String
    }

    /// Runs `python script args...` in the venv, feeding `stdin`.
    public func run(script: String, arguments: [String] = [], stdin: String = "") throws -> Output {
        try BuildGridVenv.runProcess(python, [script] + arguments, stdin: stdin)
    }

    /// Runs `python -c code args...` in the venv.
    public func run(code: String, arguments: [String] = [], stdin: String = "") throws -> Output {
        try BuildGridVenv.runProcess(python, ["-c", code] + arguments, stdin: stdin)
    }

    static func runProcess(_ exe: String, _ args: [String], stdin: String = "", environment: [String: String]? = nil) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        if let environment { p.environment = environment }
        let out = Pipe(), err = Pipe(), inp = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = inp
        try p.run()
        // Read both pipes concurrently so that neither fills up and blocks the child.
        let errData = ReadBox()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async {
            errData.set(err.fileHandleForReading.readDataToEndOfFile())
            group.leave()
        }
        if !stdin.isEmpty { inp.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? inp.fileHandleForWriting.close()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        p.waitUntilExit()
        return Output(status: p.terminationStatus,
                      stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData.get(), as: UTF8.self))
    }
}

private final class ReadBox: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func set(_ d: Data) { lock.lock(); data = d; lock.unlock() }
    func get() -> Data { lock.lock(); defer { lock.unlock() }; return data }
}

private final class SharedVenv: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<BuildGridVenv, TestSupportError>?

    func get() throws -> BuildGridVenv {
        lock.lock()
        defer { lock.unlock() }
        if let result { return try result.get() }
        let r = Result { try setUp() }.mapError { $0 as? TestSupportError ?? TestSupportError("\($0)") }
        result = r
        return try r.get()
    }

    private func setUp() throws -> BuildGridVenv {
        let env = ProcessInfo.processInfo.environment
        let dir = env["CASFS_BUILDGRID_VENV"].flatMap { $0.isEmpty ? nil : $0 }
            ?? BuildGridVenv.packageRoot + "/.build-venv/buildgrid"
        let venv = BuildGridVenv(directory: dir)
        let check = "import buildgrid.server.cas.storage.index.redis"
        if FileManager.default.isExecutableFile(atPath: venv.python),
           let out = try? BuildGridVenv.runProcess(venv.python, ["-c", check]), out.status == 0 {
            return venv
        }
        let script = BuildGridVenv.packageRoot + "/scripts/setup-buildgrid-venv"
        let out = try BuildGridVenv.runProcess("/bin/bash", [script, dir])
        guard out.status == 0 else {
            throw TestSupportError("setting up the BuildGrid venv at \(dir) failed (exit \(out.status)):\n\(out.stderr)\(out.stdout)")
        }
        let again = try BuildGridVenv.runProcess(venv.python, ["-c", check])
        guard again.status == 0 else {
            throw TestSupportError("BuildGrid venv at \(dir) still cannot import BuildGrid's RedisIndex:\n\(again.stderr)")
        }
        return venv
    }
}
