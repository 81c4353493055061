import GRPCCore
import REAPI
import SwiftProtobuf

/// Adds to every call what BuildGrid's own client adds: the binary
/// `build.bazel.remote.execution.v2.requestmetadata-bin` header naming the
/// tool, and, with a token file, `authorization: Bearer <token>`.
struct CallMetadataInterceptor: ClientInterceptor {
    static let requestMetadataKey = "build.bazel.remote.execution.v2.requestmetadata-bin"
    static let authorizationKey = "authorization"

    let token: AuthTokenFile?
    let requestMetadata: [UInt8]

    init(token: AuthTokenFile?, toolName: String = "casfs", toolVersion: String = "") {
        self.token = token
        var m = Build_Bazel_Remote_Execution_V2_RequestMetadata()
        m.toolDetails.toolName = toolName
        m.toolDetails.toolVersion = toolVersion
        requestMetadata = (try? m.serializedBytes()) ?? []
    }

    func intercept<Input: Sendable, Output: Sendable>(
        request: StreamingClientRequest<Input>,
        context: ClientContext,
        next: (StreamingClientRequest<Input>, ClientContext) async throws -> StreamingClientResponse<Output>
    ) async throws -> StreamingClientResponse<Output> {
        var request = request
        if !requestMetadata.isEmpty {
            request.metadata.replaceOrAddBinary(requestMetadata, forKey: Self.requestMetadataKey)
        }
        if let token {
            request.metadata.replaceOrAddString("Bearer " + token.current(), forKey: Self.authorizationKey)
        }
        return try await next(request, context)
    }
}
