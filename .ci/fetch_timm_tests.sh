#!/usr/bin/env bash
# Fetches timm's own tests/test_models.py for the installed timm from its source distribution on the package
# index and caches it under ~/.cache/fastvit/timm-tests/<version>/ (once per version; later runs are a no-op).
# tests/test_timm_suite.py runs it against patched timm models and fastvit's models.
# The file is copied without timm's tests/__init__.py so it imports as a top-level module, apart from fastvit's
# own tests package. Usage: .ci/fetch_timm_tests.sh [python]   (default: python on the PATH)
set -euo pipefail
PY="${1:-python}"
VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
DEST="${FASTVIT_TIMM_TESTS:-$HOME/.cache/fastvit/timm-tests/$VERSION}"
if [ -f "$DEST/test_models.py" ]; then
  echo ".ci/fetch_timm_tests.sh: timm $VERSION tests cached in $DEST"
  exit 0
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "timm==$VERSION" -d "$WORK"
tar -xzf "$WORK/timm-$VERSION.tar.gz" -C "$WORK" "timm-$VERSION/tests/test_models.py"
mkdir -p "$(dirname "$DEST")"
STAGE=$(mktemp -d "$(dirname "$DEST")/.stage.XXXXXX")
cp "$WORK/timm-$VERSION/tests/test_models.py" "$STAGE/"
rm -rf "$DEST"
mv "$STAGE" "$DEST"  # whole folder renamed into place: a half-fetched cache is never seen as complete
echo ".ci/fetch_timm_tests.sh: timm $VERSION tests fetched into $DEST"
