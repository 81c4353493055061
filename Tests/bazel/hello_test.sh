#!/bin/sh
out=$(./hello test)
[ "$out" = "hello test" ] || { echo "unexpected: $out"; exit 1; }
