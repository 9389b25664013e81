package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// This file lays out the daemon's results as mdadm 4.2 and /proc/mdstat
// do (reference notes §5.2 and §5.5).

// ctime formats t as C's ctime() without its newline, which is what mdadm
// prints with %.24s.
func ctime(t time.Time, loc *time.Location) string {
	if loc == nil {
		loc = time.Local
	}
	return t.In(loc).Format("Mon Jan _2 15:04:05 2006")
}

// perMille is the kernel's progress: done/total in thousandths, counted in
// sectors the way status_resync does.
func perMille(s *ctl.Sync) uint64 {
	return s.DoneKiB * 2 * 1000 / (s.TotalKiB*2 + 1)
}

func levelName(l int) string { return fmt.Sprintf("raid%d", l) }

// r10Layout is mdadm's print_r10_layout text for md's raid10 layout word.
func r10Layout(layout uint32) string {
	near, far, offset := layout&0xff, layout>>8&0xff, layout&0x10000 != 0
	var b strings.Builder
	sep := ""
	if near != 1 {
		fmt.Fprintf(&b, "%s near=%d", sep, near)
		sep = ","
	}
	if far != 1 {
		kind := "far"
		if offset {
			kind = "offset"
		}
		fmt.Fprintf(&b, "%s %s=%d", sep, kind, far)
	}
	if near*far == 1 {
		b.WriteString("NO REDUNDANCY")
	}
	return b.String()
}

// syncWords maps a sync action to the State flag and the Status label.
func syncWords(action string) (state, label string) {
	switch action {
	case "recovery":
		return ", recovering", "Rebuild"
	case "reshape":
		return ", reshaping", "Reshape"
	case "check":
		return ", checking", "Check"
	}
	return ", resyncing", "Resync"
}

// writeDetail prints d the way mdadm 4.2's --detail does. homehost is the
// local homehost for the "(local to host X)" note ("" for none).
func writeDetail(w io.Writer, d *ctl.Detail, homehost string, loc *time.Location) {
	p := func(label, format string, a ...any) {
		fmt.Fprintf(w, "%18s : "+format+"\n", append([]any{label}, a...)...)
	}
	fmt.Fprintf(w, "%s:\n", d.Array)
	p("Version", "%s", d.Version)
	p("Creation Time", "%s", ctime(d.Created, loc))
	p("Raid Level", "%s", levelName(d.Level))
	p("Array Size", "%d%s", d.ArrayKiB, bitmap.HumanSize(int64(d.ArrayKiB)<<10))
	if d.UsedDevKiB == 0 {
		p("Used Dev Size", "unknown")
	} else {
		p("Used Dev Size", "%d%s", d.UsedDevKiB, bitmap.HumanSize(int64(d.UsedDevKiB)<<10))
	}
	p("Raid Devices", "%d", d.RaidDevices)
	p("Total Devices", "%d", d.TotalDevices)
	p("Persistence", "Superblock is persistent\n")
	switch d.Bitmap {
	case ctl.BitmapClustered:
		p("Intent Bitmap", "Internal(Clustered)\n")
	case ctl.BitmapInternal:
		p("Intent Bitmap", "Internal\n")
	}
	p("Update Time", "%s", ctime(d.Updated, loc))
	state := d.State
	if state == "" {
		state = "clean"
	}
	if d.Failed {
		state += ", FAILED"
	} else if d.Degraded {
		state += ", degraded"
	}
	if s := d.Sync; s != nil {
		word, _ := syncWords(s.Action)
		state += word
	}
	if d.NotStarted {
		state += ", Not Started"
	}
	if s := d.Sync; s != nil && s.Special != "" {
		state += " (" + s.Special + ")"
	}
	p("State", "%s ", state)
	p("Active Devices", "%d", d.ActiveDevices)
	p("Working Devices", "%d", d.WorkingDevices)
	p("Failed Devices", "%d", d.FailedDevices)
	p("Spare Devices", "%d", d.SpareDevices)
	fmt.Fprintln(w)
	if d.Level == 10 {
		p("Layout", "%s", strings.TrimPrefix(r10Layout(d.Layout), " "))
		if d.ChunkKiB != 0 {
			p("Chunk Size", "%dK\n", d.ChunkKiB)
		}
	}
	if d.ConsistencyPolicy != "" {
		p("Consistency Policy", "%s\n", d.ConsistencyPolicy)
	}
	if s := d.Sync; s != nil && s.Special == "" {
		_, label := syncWords(s.Action)
		fmt.Fprintf(w, "    %7s Status : %d%% complete\n\n", label, perMille(s)/10)
	}
	local := ""
	if homehost != "" && strings.HasPrefix(d.Name, homehost+":") {
		local = "  (local to host " + homehost + ")"
	}
	p("Name", "%.32s%s", d.Name, local)
	if d.Bitmap == ctl.BitmapClustered {
		p("Cluster Name", "%-64s", d.ClusterName)
	}
	p("UUID", "%s", d.UUID)
	p("Events", "%d\n", d.Events)
	fmt.Fprintf(w, "    Number   Major   Minor   RaidDevice State\n")
	blank := false
	for _, r := range d.Devices {
		if r.RaidDevice < 0 && !blank {
			fmt.Fprintln(w)
			blank = true
		}
		switch {
		case r.Number < 0 && r.RaidDevice < 0:
			fmt.Fprintf(w, "       -   %5d    %5d        -     ", r.Major, r.Minor)
		case r.RaidDevice < 0:
			fmt.Fprintf(w, "   %5d   %5d    %5d        -     ", r.Number, r.Major, r.Minor)
		case r.Number < 0:
			fmt.Fprintf(w, "       -   %5d    %5d    %5d     ", r.Major, r.Minor, r.RaidDevice)
		default:
			fmt.Fprintf(w, "   %5d   %5d    %5d    %5d     ", r.Number, r.Major, r.Minor, r.RaidDevice)
		}
		if r.Faulty {
			fmt.Fprint(w, " faulty")
		}
		if r.Active {
			fmt.Fprint(w, " active")
		}
		if r.InSync {
			fmt.Fprint(w, " sync")
			if set := r10Set(d, r.RaidDevice); set != "" {
				fmt.Fprint(w, " set-"+set)
			}
		}
		if r.Removed {
			fmt.Fprint(w, " removed")
		}
		if r.WriteMostly {
			fmt.Fprint(w, " writemostly")
		}
		if r.FailFast {
			fmt.Fprint(w, " failfast")
		}
		if !r.Active && !r.InSync && !r.Removed && !r.Faulty {
			fmt.Fprint(w, " spare")
			if r.RaidDevice >= 0 && r.RaidDevice < d.RaidDevices {
				fmt.Fprint(w, " rebuilding")
			}
		}
		if r.Device != "" {
			fmt.Fprintf(w, "   %s", r.Device)
		}
		fmt.Fprintln(w)
	}
}

// r10Set is the " set-X" mdadm adds for raid10 near layouts whose
// devices divide into sets.
func r10Set(d *ctl.Detail, slot int) string {
	if d.Level != 10 || d.Layout&^0x1ffff != 0 || slot < 0 {
		return ""
	}
	nc, fc := int(d.Layout&0xff), int(d.Layout>>8&0xff)
	copies := nc * fc
	if fc != 1 || copies == 0 || d.RaidDevices%copies != 0 || copies > 26 {
		return ""
	}
	return string(rune('A' + slot%copies))
}

// writeMdstat prints the arrays the way /proc/mdstat does.
func writeMdstat(w io.Writer, l *ctl.ArrayList) {
	fmt.Fprintf(w, "Personalities : [raid1] [raid10] \n")
	for _, a := range l.Arrays {
		fmt.Fprintf(w, "%s : ", a.Name)
		if a.Active {
			fmt.Fprint(w, "active")
			if a.Readonly {
				fmt.Fprint(w, " (read-only)")
			}
			fmt.Fprintf(w, " %s", levelName(a.Level))
		} else {
			fmt.Fprint(w, "inactive")
		}
		for _, m := range a.Members {
			fmt.Fprintf(w, " %s[%d]", m.Name, m.Number)
			if m.WriteMostly {
				fmt.Fprint(w, "(W)")
			}
			if m.Faulty {
				fmt.Fprint(w, "(F)")
				continue
			}
			if m.Spare {
				fmt.Fprint(w, "(S)")
			}
			if m.Replacement {
				fmt.Fprint(w, "(R)")
			}
		}
		fmt.Fprintf(w, "\n      %d blocks", a.BlocksKiB)
		if a.Version != "" {
			fmt.Fprintf(w, " super %s", a.Version)
		}
		if !a.Active {
			fmt.Fprint(w, "\n\n")
			continue
		}
		if a.Level == 10 {
			fmt.Fprintf(w, " %dK chunks", a.ChunkKiB)
			near, far := a.Layout&0xff, a.Layout>>8&0xff
			if near > 1 {
				fmt.Fprintf(w, " %d near-copies", near)
			}
			if far > 1 {
				if a.Layout&0x10000 != 0 {
					fmt.Fprintf(w, " %d offset-copies", far)
				} else {
					fmt.Fprintf(w, " %d far-copies", far)
				}
			}
		}
		in := 0
		var pat strings.Builder
		for _, u := range a.Slots {
			if u {
				in++
				pat.WriteByte('U')
			} else {
				pat.WriteByte('_')
			}
		}
		fmt.Fprintf(w, " [%d/%d] [%s]", a.RaidDevices, in, pat.String())
		fmt.Fprint(w, "\n      ")
		if s := a.Sync; s != nil {
			fmt.Fprint(w, progressLine(s))
			fmt.Fprint(w, "\n      ")
		}
		if b := a.Bitmap; b != nil {
			chunk := fmt.Sprintf("%dKB", b.ChunkBytes>>10)
			if b.ChunkBytes < 1024 {
				chunk = fmt.Sprintf("%dB", b.ChunkBytes)
			}
			fmt.Fprintf(w, "bitmap: %d/%d pages [%dKB], %s chunk", b.Pages, b.TotalPages, b.Pages*4, chunk)
		}
		fmt.Fprint(w, "\n\n")
	}
	fmt.Fprint(w, "unused devices: <none>\n")
}

// progressLine is mdstat's sync line (without its indentation): the bar,
// the percentage, finish and speed, or "\tresync=REMOTE" and the like.
func progressLine(s *ctl.Sync) string {
	if s.Special != "" {
		verb := "resync"
		if s.Special == "REMOTE" {
			switch s.Action {
			case "recovery":
				verb = "recover"
			case "reshape":
				verb = "reshape"
			}
		}
		return "\t" + verb + "=" + s.Special
	}
	pm := perMille(s)
	x := int(pm / 50)
	if x > 20 {
		x = 20
	}
	verb := s.Action
	if verb == "" {
		verb = "resync"
	}
	rest := s.TotalKiB - min(s.DoneKiB, s.TotalKiB)
	secs := rest
	if s.SpeedKiB > 0 {
		secs = rest / s.SpeedKiB
	}
	return fmt.Sprintf("[%s>%s]  %s =%3d.%d%% (%d/%d) finish=%d.%dmin speed=%dK/sec",
		strings.Repeat("=", x), strings.Repeat(".", 20-x), verb, pm/10, pm%10,
		s.DoneKiB, s.TotalKiB, secs/60, secs%60/6, s.SpeedKiB)
}
