package vmtest

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// CacheEnv names the environment variable that overrides the cache
// directory (kernel packages, extracted kernels).
const CacheEnv = "MDCLUSTER_VMTEST_CACHE"

// metaPackage is Debian's metapackage that depends on the current kernel.
const metaPackage = "linux-image-amd64"

// CacheDir returns the directory VM tests keep downloads in: $CacheEnv if
// set, else mdcluster-vmtest in the user's cache directory (next to Go's
// build cache by default).
func CacheDir() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return d, nil
	}
	base, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("vmtest cache: %w (set %s)", err, CacheEnv)
	}
	return filepath.Join(base, "mdcluster-vmtest"), nil
}

// Kernel is a bootable kernel with a set of its modules.
type Kernel struct {
	Package string   // Debian package it came from, e.g. linux-image-6.1.0-56-amd64
	Image   string   // path of the kernel image (vmlinuz)
	Modules []string // paths of the .ko files, in an order insmod accepts
}

// ModuleName normalises a module or .ko file name the way the kernel does:
// no directory, no .ko suffix, '-' read as '_'.
func ModuleName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// FetchKernel returns the kernel Debian's linux-image-amd64 currently
// depends on, with the named modules and everything they depend on. The
// first call downloads the package with apt-get (no root needed) and keeps
// the kernel image and the needed modules under cacheDir; later calls
// reuse them without network. When apt cannot name the current package
// (no package lists), the newest kernel already in the cache is used.
func FetchKernel(cacheDir string, modules []string) (*Kernel, error) {
	pkg, err := currentKernelPackage()
	if err != nil {
		cached, cerr := newestCachedKernel(cacheDir)
		if cerr != nil || cached == "" {
			return nil, fmt.Errorf("finding the kernel package: %w", err)
		}
		pkg = cached
	}
	dir := filepath.Join(cacheDir, "kernel", pkg)
	if k, err := loadKernel(dir, pkg, modules); err == nil {
		return k, nil
	}
	if err := extractKernel(dir, pkg, modules); err != nil {
		return nil, fmt.Errorf("extracting %s: %w", pkg, err)
	}
	return loadKernel(dir, pkg, modules)
}

// kernelPkgRE matches the versioned kernel package the metapackage depends on.
var kernelPkgRE = regexp.MustCompile(`^\s*Depends:\s*(linux-image-[0-9][^\s]*-amd64)\s*$`)

// currentKernelPackage asks apt which versioned package linux-image-amd64
// depends on.
func currentKernelPackage() (string, error) {
	out, err := exec.Command("apt-cache", "depends", metaPackage).Output()
	if err != nil {
		return "", fmt.Errorf("apt-cache depends %s: %w", metaPackage, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := kernelPkgRE.FindStringSubmatch(sc.Text()); m != nil {
			return m[1], nil
		}
	}
	return "", fmt.Errorf("apt-cache depends %s names no linux-image-*-amd64 package", metaPackage)
}

// newestCachedKernel returns the name of the most recently extracted
// kernel in the cache, "" if there is none.
func newestCachedKernel(cacheDir string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(cacheDir, "kernel"))
	if err != nil {
		return "", err
	}
	best, bestTime := "", int64(0)
	for _, e := range ents {
		st, err := os.Stat(filepath.Join(cacheDir, "kernel", e.Name(), "vmlinuz"))
		if err == nil && st.ModTime().UnixNano() > bestTime {
			best, bestTime = e.Name(), st.ModTime().UnixNano()
		}
	}
	return best, nil
}

// depsFile is the cache's own module dependency list, one line per module:
// "name: dep dep ...". (Debian's package ships no modules.dep; depmod
// writes it at install time.)
const depsFile = "modules.deps"

// loadKernel resolves modules against an extracted cache directory. It
// fails when the directory lacks the image or any needed module.
func loadKernel(dir, pkg string, modules []string) (*Kernel, error) {
	image := filepath.Join(dir, "vmlinuz")
	if _, err := os.Stat(image); err != nil {
		return nil, err
	}
	deps, err := readDeps(filepath.Join(dir, depsFile))
	if err != nil {
		return nil, err
	}
	order, err := loadOrder(modules, func(name string) ([]string, error) {
		d, ok := deps[name]
		if !ok {
			return nil, fmt.Errorf("module %s not in the cache", name)
		}
		return d, nil
	})
	if err != nil {
		return nil, err
	}
	k := &Kernel{Package: pkg, Image: image}
	for _, name := range order {
		k.Modules = append(k.Modules, filepath.Join(dir, "modules", name+".ko"))
	}
	return k, nil
}

func readDeps(path string) (map[string][]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	deps := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if ok {
			deps[name] = strings.Fields(rest)
		}
	}
	return deps, nil
}

// loadOrder lists modules and their dependencies so that each comes after
// everything it depends on.
func loadOrder(modules []string, depsOf func(string) ([]string, error)) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(string) error
	visit = func(name string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		state[name] = 1
		deps, err := depsOf(name)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name)
		return nil
	}
	for _, m := range modules {
		if err := visit(ModuleName(m)); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// extractKernel downloads pkg (unless its .deb is already in dir), unpacks
// it in a temporary directory and copies the kernel image and the modules
// needed into dir, merging with whatever dir already has.
func extractKernel(dir, pkg string, modules []string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		cmd := exec.Command("apt-get", "download", "-q", pkg)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get download %s: %w\n%s", pkg, err, out)
		}
		if debs, _ = filepath.Glob(filepath.Join(dir, pkg+"_*.deb")); len(debs) == 0 {
			return fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
		}
	}
	tmp, err := os.MkdirTemp(dir, "x-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if out, err := exec.Command("dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg-deb -x %s: %w\n%s", debs[0], err, out)
	}
	images, _ := filepath.Glob(filepath.Join(tmp, "boot", "vmlinuz-*"))
	if len(images) != 1 {
		return fmt.Errorf("%s holds %d boot/vmlinuz-* files, want 1", debs[0], len(images))
	}
	index, err := indexModules(tmp)
	if err != nil {
		return err
	}
	deps, err := readDeps(filepath.Join(dir, depsFile))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if deps == nil {
		deps = map[string][]string{}
	}
	order, err := loadOrder(modules, func(name string) ([]string, error) {
		path, ok := index[name]
		if !ok {
			return nil, fmt.Errorf("module %s is not in %s", name, pkg)
		}
		d, err := moduleDepends(path)
		if err != nil {
			return nil, err
		}
		deps[name] = d
		return d, nil
	})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "modules"), 0o755); err != nil {
		return err
	}
	for _, name := range order {
		if err := copyFile(index[name], filepath.Join(dir, "modules", name+".ko")); err != nil {
			return err
		}
	}
	var names []string
	for n := range deps {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%s: %s\n", n, strings.Join(deps[n], " "))
	}
	if err := os.WriteFile(filepath.Join(dir, depsFile), []byte(b.String()), 0o644); err != nil {
		return err
	}
	// The image last: its presence marks the directory complete.
	return copyFile(images[0], filepath.Join(dir, "vmlinuz"))
}

// indexModules maps module names to .ko paths under root/lib/modules.
func indexModules(root string) (map[string]string, error) {
	index := map[string]string{}
	err := filepath.WalkDir(filepath.Join(root, "lib", "modules"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			index[ModuleName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing modules: %w", err)
	}
	if len(index) == 0 {
		return nil, errors.New("no uncompressed .ko modules found in the package")
	}
	return index, nil
}

// moduleDepends reads the "depends=" entry of a module's .modinfo section.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("reading .modinfo of %s: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, ModuleName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
