import NIOCore
import NIOHTTP1

/// Answers the requests of one connection, in order:
/// - `GET /metrics`: 200, the exposition as `text/plain; version=0.0.4`;
/// - `HEAD /metrics`: the same head, no body;
/// - another method on `/metrics`: 405 (with `Allow: GET, HEAD`);
/// - any other path: 404.
/// A query string is ignored; a request body is read and dropped. The
/// connection stays open for the next request unless the client asked to
/// close it (HTTP/1.0 without keep-alive, `Connection: close`).
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// Prometheus's text format, version 0.0.4 (Prometheus 3 needs the header).
    static let contentType = "text/plain; version=0.0.4; charset=utf-8"
    static let path = "/metrics"

    private let render: @Sendable () -> String
    private var request: HTTPRequestHead?

    init(render: @escaping @Sendable () -> String) {
        self.render = render
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            request = head
        case .body:
            break
        case .end:
            guard let head = request else { return }
            request = nil
            respond(to: head, context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    private func respond(to head: HTTPRequestHead, context: ChannelHandlerContext) {
        let path = head.uri.prefix { $0 != "?" }
        var headers = HTTPHeaders()
        let status: HTTPResponseStatus
        let body: String
        if path != Self.path {
            status = .notFound
            body = "not found; metrics are at \(Self.path)\n"
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else if head.method == .GET || head.method == .HEAD {
            status = .ok
            body = render()
            headers.add(name: "Content-Type", value: Self.contentType)
        } else {
            status = .methodNotAllowed
            body = "method not allowed\n"
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
            headers.add(name: "Allow", value: "GET, HEAD")
        }
        let buffer = context.channel.allocator.buffer(string: body)
        headers.add(name: "Content-Length", value: String(buffer.readableBytes))
        let keepAlive = head.isKeepAlive
        if !keepAlive {
            headers.add(name: "Connection", value: "close")
        } else if head.version == .http1_0 {
            headers.add(name: "Connection", value: "keep-alive")
        }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        if head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let sent = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            sent.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }
}
