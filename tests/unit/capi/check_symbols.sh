#!/bin/sh
# Checks libcompanion.so's dynamic interface:
# - the exported (defined, dynamic) C symbols are exactly the COMPANION_API functions of
#   companion.h, and the C++ ones exactly the functions the version script's C++ node names
#   (the C++ API of client.hpp, types.hpp, result.hpp): any extra or missing symbol fails;
# - its SONAME is libcompanion.so.0;
# - it needs no shared library beyond libc, libstdc++, libm, libgcc_s, libdl, libcurl (the etcd
#   registry's HTTP client) and the sanitizer runtimes in sanitizer builds. CUDA is dlopen'ed.
# Usage: check_symbols.sh LIBCOMPANION_SO COMPANION_H COMPANION_MAP (the configured script)
#   (NM, OBJDUMP, CXXFILT may name the tools)
set -eu
lib=$1
header=$2
map=$3
nm=${NM:-nm}
cxxfilt=${CXXFILT:-c++filt}
objdump=${OBJDUMP:-objdump}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# "0000000000007893 T companion_free@@COMPANION_0"; the version nodes themselves are A symbols.
node='^COMPANION_(CXX_)?[0-9.]+$'
"$nm" -D --defined-only "$lib" >"$tmp/nm"
awk -v node="$node" '!($2 == "A" && $3 ~ node) && $3 !~ /^_Z/ { print $3 }' "$tmp/nm" |
  sed 's/@.*//' | sort -u >"$tmp/exported"
awk -v node="$node" '$2 != "T" && !($2 == "A" && $3 ~ node)' "$tmp/nm" >"$tmp/not_functions"
# C++ symbols, demangled, each with the node it belongs to.
awk '$3 ~ /^_Z/ { print $3 }' "$tmp/nm" | "$cxxfilt" | sort -u >"$tmp/exported_cxx"

# Declarations: "COMPANION_API <return type> <name>(" (the name may be preceded by '*').
grep -v '^[[:space:]]*#' "$header" | tr '\n' ' ' | grep -o 'COMPANION_API[^(;]*(' |
  sed 's/($//' | awk '{ print $NF }' | sed 's/^\**//' | sort -u >"$tmp/declared"

# The C++ node's exact names ("companion::dtype_name(companion::DType)"), with the node's name.
cxx_node=$(sed -n 's/^\(COMPANION_CXX_[^ ]*\) {$/\1/p' "$map")
sed -n 's/^ *"\(.*\)";$/\1/p' "$map" | sed "s/\$/@@$cxx_node/" | sort -u >"$tmp/declared_cxx"

status=0
cxx_extra=$(comm -13 "$tmp/declared_cxx" "$tmp/exported_cxx")
cxx_missing=$(comm -23 "$tmp/declared_cxx" "$tmp/exported_cxx")
if [ "$(wc -l <"$tmp/declared_cxx")" -lt 10 ]; then
  echo "only $(wc -l <"$tmp/declared_cxx") C++ names parsed from $map: the parser is broken" >&2
  status=1
fi
if [ -n "$cxx_extra" ]; then
  echo "C++ symbols exported but not named in $map:" >&2
  echo "$cxx_extra" | sed 's/^/  /' >&2
  status=1
fi
if [ -n "$cxx_missing" ]; then
  echo "named in $map but not exported" \
    "(a signature changed, or its definition is not linked in):" >&2
  echo "$cxx_missing" | sed 's/^/  /' >&2
  status=1
fi
declared=$(wc -l <"$tmp/declared")
if [ "$declared" -lt 20 ]; then
  echo "only $declared COMPANION_API functions parsed from $header: the parser is broken" >&2
  status=1
fi
extra=$(comm -13 "$tmp/declared" "$tmp/exported")
missing=$(comm -23 "$tmp/declared" "$tmp/exported")
if [ -n "$extra" ]; then
  echo "exported but not declared in companion.h:" >&2
  echo "$extra" | sed 's/^/  /' >&2
  status=1
fi
if [ -n "$missing" ]; then
  echo "declared in companion.h but not exported:" >&2
  echo "$missing" | sed 's/^/  /' >&2
  status=1
fi
if [ -s "$tmp/not_functions" ]; then
  echo "exported symbols that are not functions:" >&2
  sed 's/^/  /' "$tmp/not_functions" >&2
  status=1
fi

soname=$("$objdump" -p "$lib" | awk '$1 == "SONAME" { print $2 }')
if [ "$soname" != "libcompanion.so.0" ]; then
  echo "SONAME is '$soname', expected libcompanion.so.0" >&2
  status=1
fi
"$objdump" -p "$lib" | awk '$1 == "NEEDED" { print $2 }' >"$tmp/needed"
unexpected=$(grep -Ev '^(libc|libstdc\+\+|libm|libgcc_s|libdl|libpthread|libcurl|ld-linux-x86-64|ld-linux-aarch64|libasan|libubsan|liblsan|libtsan)\.so(\.[0-9]+)*$' "$tmp/needed" || true)
if [ -n "$unexpected" ]; then
  echo "unexpected shared library dependencies:" >&2
  echo "$unexpected" | sed 's/^/  /' >&2
  status=1
fi

if [ "$status" -eq 0 ]; then
  echo "libcompanion.so exports exactly the $declared functions of companion.h and the" \
    "$(wc -l <"$tmp/declared_cxx") C++ API functions of $cxx_node"
  echo "SONAME $soname; needs: $(tr '\n' ' ' <"$tmp/needed")"
fi
exit "$status"
