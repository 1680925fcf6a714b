// Package atomicfile writes files so that a crash leaves either the old
// content or the new one, never half of either.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteFile writes data to path with mode through a synced temporary file in
// the same directory, renamed into place.
func WriteFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// MkdirPrivate creates dir (and its parents) readable only by its owner, or
// tightens an existing dir that others may read or enter to 0700: the
// files in it are secrets, and a pre-existing 0755 directory would make any
// file created without an explicit mode world-readable. It refuses a
// directory it cannot tighten, and a shared sticky one such as /tmp.
func MkdirPrivate(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if fi.Mode()&os.ModeSticky != 0 {
		return fmt.Errorf("%s is a shared directory (sticky, like /tmp); give a directory of its own, e.g. %s", dir, filepath.Join(dir, "meshlink"))
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("%s is open to other users (mode %04o) and cannot be made private: %w; run chmod 700 %s", dir, fi.Mode().Perm(), err, dir)
	}
	return nil
}
