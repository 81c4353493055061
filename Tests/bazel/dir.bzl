def _make_dir_impl(ctx):
    out = ctx.actions.declare_directory(ctx.label.name + ".d")
    ctx.actions.run_shell(
        inputs = [ctx.file.src],
        outputs = [out],
        command = "mkdir -p {o}/sub && cp {s} {o}/copy.txt && echo nested > {o}/sub/n.txt && ln -s copy.txt {o}/link".format(o = out.path, s = ctx.file.src.path),
    )
    return [DefaultInfo(files = depset([out]))]

make_dir = rule(
    implementation = _make_dir_impl,
    attrs = {"src": attr.label(allow_single_file = True)},
)
