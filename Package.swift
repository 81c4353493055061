// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "casfs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "casfs", targets: ["casfs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"4.0.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Digests, the Storage protocol, blob sources and errors. No backends.
        .target(name: "CASCore", dependencies: [
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Thin C surfaces.
        .systemLibrary(name: "CHiredis", path: "Sources/CHiredis"),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        .systemLibrary(name: "CFuse", path: "Sources/CFuse", pkgConfig: "fuse3"),
        // A pooled, pipelining Redis client over hiredis.
        .target(name: "Redis", dependencies: [
            "CHiredis",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Backends and decorators, one per file, and the Redis index.
        .target(name: "CASStorage", dependencies: [
            "CASCore", "Redis", "CLinux",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Generated REAPI / ByteStream messages (Protos/, scripts/generate-protos).
        .target(name: "REAPI", dependencies: [
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        // Input roots: REAPI Directory messages parsed, checked and cached;
        // local directories encoded as Merkle trees.
        .target(name: "CASTree", dependencies: [
            "CASCore", "REAPI",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // A REAPI v2 CAS over gRPC (generated client stubs + RemoteStorage).
        // CASConfig, CASWorker and the tests depend on it.
        .target(name: "RemoteCAS", dependencies: [
            "CASCore", "REAPI",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // `casfs worker`: a bot of BuildGrid's Bots API running each action
        // on its lazy input root (Bots client, action runner, result upload).
        .target(name: "CASWorker", dependencies: [
            "CASCore", "CASTree", "REAPI", "RemoteCAS", "CASSandbox",
            .product(name: "GRPCCore", package: "grpc-swift-2"),
            .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // YAML configuration (BuildGrid storage tags) -> a storage stack.
        .target(name: "CASConfig", dependencies: [
            "CASCore", "CASStorage", "Redis", "RemoteCAS",
            .product(name: "Yams", package: "Yams"),
        ]),
        // The FUSE kernel protocol: ABI, request decoding, reply encoding, the
        // request loop, notifications, passthrough. No storage knowledge;
        // libfuse is used only to mount and unmount.
        .target(name: "FuseKernel", dependencies: ["CFuse", "CLinux"]),
        // The filesystem: one view per top-level directory over the protocol module.
        .target(name: "CASFuse", dependencies: [
            "FuseKernel", "CASCore", "CASTree", "CLinux",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // GET /metrics over HTTP/1.1 for Prometheus, on a thread of its own
        // (a poll loop over its own sockets, with bounded connections,
        // timeouts and memory).
        .target(name: "MetricsServer", dependencies: ["CASCore", "CLinux"]),
        // Child processes: spawning with a clean signal state and only the
        // descriptors asked for, waiting (pidfd), pipes.
        .target(name: "CASProcess", dependencies: ["CLinux"]),
        // The build sandbox of `casfs run` (bubblewrap), for the CLI and for
        // library callers: layout, the fail-closed check, running a command
        // with a deadline, and removing scratch directories at any depth.
        .target(name: "CASSandbox", dependencies: ["CASProcess", "CLinux"]),
        // The daemon's pieces as services: serving a filesystem on a mount
        // point, the metrics server, the private Redis and its watchdog,
        // background reindex, the mount lock; one ServiceGroup starts,
        // stops and signals them.
        .target(name: "CASDaemon", dependencies: [
            "CASCore", "CASStorage", "CASConfig", "CASFuse", "FuseKernel", "MetricsServer", "Redis", "CASProcess", "CLinux",
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "casfs", dependencies: [
            "CASCore", "CASStorage", "CASConfig", "CASFuse", "CASTree", "Redis", "CLinux", "MetricsServer",
            "CASProcess", "CASSandbox", "CASDaemon", "CASWorker", "RemoteCAS",
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Benchmark driver for bench/redis-index (not a test).
        .executableTarget(name: "casfs-bench-redis", dependencies: [
            "CASCore", "CASStorage", "Redis",
        ], path: "bench/Sources/RedisIndexBench"),

        .target(name: "TestSupport", dependencies: ["CASCore", "Redis"], path: "Tests/TestSupport"),
        .testTarget(name: "CASCoreTests", dependencies: ["CASCore", .product(name: "Logging", package: "swift-log")]),
        // A kernel-free FUSE session for tests: encoded requests in, typed replies out.
        .target(name: "FuseTestHarness", dependencies: ["FuseKernel"], path: "Tests/FuseTestHarness"),
        .testTarget(name: "FuseKernelTests", dependencies: ["FuseKernel", "FuseTestHarness"]),
        // The filesystem's views driven through the harness (no kernel).
        .testTarget(name: "CASFuseTests", dependencies: [
            "CASFuse", "FuseKernel", "FuseTestHarness", "CASCore", "CASStorage", "CASTree", "REAPI",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .testTarget(name: "CASStorageTests", dependencies: ["CASCore", "CASStorage", "CASConfig", "TestSupport"]),
        .testTarget(name: "RedisIndexTests", dependencies: ["CASCore", "CASStorage", "Redis", "TestSupport"]),
        .testTarget(name: "ConfigTests", dependencies: ["CASCore", "CASStorage", "CASConfig", "Redis", "RemoteCAS", "TestSupport"]),
        .testTarget(name: "CLITests", dependencies: ["CASCore", "CASStorage", "Redis", "TestSupport"]),
        .testTarget(name: "MountTests", dependencies: [
            "CASCore", "CASStorage", "CASTree", "REAPI", "TestSupport",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .testTarget(name: "MetricsServerTests", dependencies: ["CASCore", "MetricsServer", "TestSupport"]),
        // The casfs command's own pieces (option parsing, systemd notification).
        .testTarget(name: "CasfsCommandTests", dependencies: ["casfs", "CASCore", "CASDaemon", "CASSandbox", "TestSupport"]),
        // The daemon's services and the sandbox, driven in-process (real
        // FUSE mounts, real redis-server, real sockets; no casfs binary).
        .testTarget(name: "CASDaemonTests", dependencies: [
            "CASDaemon", "CASSandbox", "CASProcess", "CASCore", "CASStorage", "CASConfig", "CASFuse", "MetricsServer",
            "Redis", "TestSupport",
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "RemoteTests", dependencies: ["CASCore", "RemoteCAS", "REAPI", "TestSupport"]),
        .testTarget(name: "WorkerTests", dependencies: [
            "CASCore", "CASWorker", "REAPI", "TestSupport",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .testTarget(name: "TreeTests", dependencies: [
            "CASCore", "CASStorage", "CASTree", "REAPI",
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
    ]
)
