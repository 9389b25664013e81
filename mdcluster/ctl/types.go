package ctl

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// Status is the result of CmdStatus: what corosync-quorumtool and
// dlm_tool status show on a Linux cluster, with the quorum expressed as
// this cluster counts it (m of n data nodes; non-data nodes never vote).
type Status struct {
	// Node describes this daemon's node.
	Node NodeInfo `json:"node"`
	// State is "running", or "leaving" once a graceful leave began.
	State string `json:"state"`
	// View is the last installed (agreed) view.
	View View `json:"view"`
	// Quorum is the quorum arithmetic over the view's members that the
	// failure detector reports alive.
	Quorum Quorum `json:"quorum"`
	// Members has one row per node that is in the view, alive in gossip,
	// or configured in the quorum, sorted by ID.
	Members []Member `json:"members"`
	// RecoveredGeneration is the last view whose lock recovery finished
	// here; locks are granted when it equals View.Generation, the node is
	// quorate and the lock manager is not stopped.
	RecoveredGeneration uint64 `json:"recovered_generation"`
	// LockManagerStopped: the lock manager is stopped (quorum lost or a
	// view change under way) and has not recovered into a view since.
	LockManagerStopped bool `json:"lock_manager_stopped"`
	// Error is set when the membership agreement stopped (the state store
	// failed); the node then needs a restart.
	Error string `json:"error,omitempty"`
	// Lockspaces lists the lockspaces open on this node.
	Lockspaces []string `json:"lockspaces"`
	// Fencing is the history of fence attempts this node ran, oldest
	// first (bounded; FencingDropped counts older ones no longer listed).
	Fencing        []FenceRecord `json:"fencing"`
	FencingDropped uint64        `json:"fencing_dropped,omitempty"`
}

// NodeInfo identifies the node and its endpoints.
type NodeInfo struct {
	ID uint32 `json:"id"`
	// Profile is the timing profile: "lan", "vm" or "storage-lan".
	Profile string `json:"profile"`
	// GossipAddr is the failure detector's endpoint (other nodes' seeds).
	GossipAddr string `json:"gossip_addr"`
	// DLMAddr is where the lock manager listens; DLMAdvertised is the
	// address published to the other nodes.
	DLMAddr       string `json:"dlm_addr"`
	DLMAdvertised string `json:"dlm_advertised"`
	// Started is when the daemon's node started.
	Started time.Time `json:"started"`
}

// View is an agreed membership view.
type View struct {
	Generation uint64   `json:"generation"`
	Members    []uint32 `json:"members"`
}

// Quorum is the data-node quorum arithmetic, in corosync-quorumtool's
// terms: every data node has one vote, other nodes none.
type Quorum struct {
	// ExpectedVotes is n, the number of configured data nodes.
	ExpectedVotes int `json:"expected_votes"`
	// TotalVotes is the number of data nodes in the view that are alive.
	TotalVotes int `json:"total_votes"`
	// Quorum is m, the data nodes needed.
	Quorum int `json:"quorum"`
	// TieBreaker is the configured tie-breaker data node (0: none) and
	// whether it counts now.
	TieBreaker        uint32 `json:"tie_breaker,omitempty"`
	TieBreakerPresent bool   `json:"tie_breaker_present,omitempty"`
	// Quorate is the node's own quorum verdict (the agreement's).
	Quorate bool `json:"quorate"`
	// Summary explains the arithmetic in one line, e.g. "3 of 3 data nodes
	// present (need 2): quorate".
	Summary string `json:"summary"`
	// DataNodes and NonDataNodes are the configured roles.
	DataNodes    []uint32 `json:"data_nodes"`
	NonDataNodes []uint32 `json:"non_data_nodes,omitempty"`
}

// Member is one node as this node sees it.
type Member struct {
	ID       uint32 `json:"id"`
	Self     bool   `json:"self,omitempty"`
	DataNode bool   `json:"data_node"`
	// Votes is 1 for a data node, 0 otherwise.
	Votes  int  `json:"votes"`
	InView bool `json:"in_view"`
	Alive  bool `json:"alive"`
	// DLMAddr is the lock manager address known for the node, and
	// DLMConnected whether an authenticated connection to it is up.
	DLMAddr      string `json:"dlm_addr,omitempty"`
	DLMConnected bool   `json:"dlm_connected,omitempty"`
}

// FenceRecord is one fence attempt run by this node.
type FenceRecord struct {
	Victim     uint32    `json:"victim"`
	Generation uint64    `json:"generation"`
	Started    time.Time `json:"started"`
	// Seconds is how long the attempt took.
	Seconds float64 `json:"seconds"`
	OK      bool    `json:"ok"`
	// Method names the fencer that succeeded ("agent fence_ipmilan",
	// "generation-stamp", ...).
	Method string `json:"method,omitempty"`
	Error  string `json:"error,omitempty"`
}

// LocksArgs are CmdLocks' arguments.
type LocksArgs struct {
	// Lockspace limits the dump to one lockspace; empty means all.
	Lockspace string `json:"lockspace,omitempty"`
}

// Locks is the result of CmdLocks.
type Locks struct {
	Node       uint32      `json:"node"`
	Lockspaces []Lockspace `json:"lockspaces"`
}

// Lockspace is one lockspace's dump.
type Lockspace struct {
	Name      string     `json:"name"`
	Resources []Resource `json:"resources"`
}

// Resource is one resource with its queues, as dlm_tool lockdebug shows
// it. On its master the queues hold every node's locks; elsewhere only
// this node's.
type Resource struct {
	Name   string `json:"name"`
	Master uint32 `json:"master"`
	// LVB is the value block in hex ("" if never written), LVBSeq its
	// sequence number.
	LVB         string `json:"lvb,omitempty"`
	LVBSeq      uint32 `json:"lvb_seq,omitempty"`
	ValNotValid bool   `json:"val_not_valid,omitempty"`
	// Idle: cached by its master with no locks.
	Idle       bool   `json:"idle,omitempty"`
	Granted    []Lock `json:"granted,omitempty"`
	Converting []Lock `json:"converting,omitempty"`
	Waiting    []Lock `json:"waiting,omitempty"`
}

// Lock is one lock on a resource's queue.
type Lock struct {
	// ID is the lock's ID on its own node, in hex (as dlm_tool prints it).
	ID string `json:"id"`
	// Node is the node the lock belongs to.
	Node  uint32 `json:"node"`
	Owner uint32 `json:"owner"`
	// Mode is the granted mode ("NL", "CR", "CW", "PR", "PW", "EX"; "IV"
	// while waiting); Requested the pending mode, empty when none.
	Mode      string `json:"mode"`
	Requested string `json:"requested,omitempty"`
	Flags     string `json:"flags,omitempty"`
	Orphan    bool   `json:"orphan,omitempty"`
}

// LeaveResult is the result of CmdLeave.
type LeaveResult struct {
	// Seconds is how long the leave took.
	Seconds float64 `json:"seconds"`
}

// WriteText prints the status the way corosync-quorumtool lays out its
// report, for a CLI.
func (s *Status) WriteText(w io.Writer) error {
	yn := func(b bool) string {
		if b {
			return "Yes"
		}
		return "No"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Quorum information\n------------------\n")
	fmt.Fprintf(&b, "Node ID:          %d\n", s.Node.ID)
	fmt.Fprintf(&b, "State:            %s\n", s.State)
	fmt.Fprintf(&b, "View generation:  %d\n", s.View.Generation)
	fmt.Fprintf(&b, "Recovered:        %d\n", s.RecoveredGeneration)
	fmt.Fprintf(&b, "Quorate:          %s\n", yn(s.Quorum.Quorate))
	fmt.Fprintf(&b, "Locks stopped:    %s\n", yn(s.LockManagerStopped))
	if s.Error != "" {
		fmt.Fprintf(&b, "Error:            %s\n", s.Error)
	}
	fmt.Fprintf(&b, "\nData-node quorum\n----------------\n")
	fmt.Fprintf(&b, "Expected votes:   %d\n", s.Quorum.ExpectedVotes)
	fmt.Fprintf(&b, "Total votes:      %d\n", s.Quorum.TotalVotes)
	fmt.Fprintf(&b, "Quorum:           %d\n", s.Quorum.Quorum)
	if s.Quorum.TieBreaker != 0 {
		fmt.Fprintf(&b, "Tie-breaker:      %d (%s)\n", s.Quorum.TieBreaker, map[bool]string{true: "present", false: "absent"}[s.Quorum.TieBreakerPresent])
	}
	fmt.Fprintf(&b, "Summary:          %s\n", s.Quorum.Summary)
	fmt.Fprintf(&b, "\nMembership information\n----------------------\n")
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("ctl: writing status: %w", err)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "    Nodeid\tVotes\tIn view\tAlive\tDLM\t\n")
	for _, m := range s.Members {
		dlm := m.DLMAddr
		switch {
		case m.Self:
			dlm = s.Node.DLMAdvertised + " (local)"
		case dlm != "" && m.DLMConnected:
			dlm += " (connected)"
		case dlm != "":
			dlm += " (not connected)"
		}
		fmt.Fprintf(tw, "%10d\t%5d\t%s\t%s\t%s\t\n", m.ID, m.Votes, yn(m.InView), yn(m.Alive), dlm)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("ctl: writing status: %w", err)
	}
	b.Reset()
	fmt.Fprintf(&b, "\nFencing history\n---------------\n")
	if len(s.Fencing) == 0 {
		b.WriteString("none\n")
	}
	if s.FencingDropped > 0 {
		fmt.Fprintf(&b, "(%d older attempts not listed)\n", s.FencingDropped)
	}
	for _, f := range s.Fencing {
		res := "fenced by " + f.Method
		if !f.OK {
			res = "FAILED: " + f.Error
		}
		fmt.Fprintf(&b, "%s  node %d for view %d in %.3fs: %s\n", f.Started.Format(time.RFC3339), f.Victim, f.Generation, f.Seconds, res)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("ctl: writing status: %w", err)
	}
	return nil
}

// WriteText prints the dump in the spirit of dlm_tool lockdebug: per
// lockspace, per resource, its master, value block and three queues, each
// lock as "ID MODE node N owner O".
func (l *Locks) WriteText(w io.Writer) error {
	var b strings.Builder
	if len(l.Lockspaces) == 0 {
		fmt.Fprintf(&b, "node %d: no lockspaces\n", l.Node)
	}
	for i, ls := range l.Lockspaces {
		if i > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "Lockspace %q (node %d)\n", ls.Name, l.Node)
		for _, r := range ls.Resources {
			fmt.Fprintf(&b, "\nResource len %2d \"%s\"\n", len(r.Name), printable(r.Name))
			if r.Master == l.Node {
				b.WriteString("Master Copy\n")
			} else {
				fmt.Fprintf(&b, "Master:%d\n", r.Master)
			}
			if r.LVB != "" {
				fmt.Fprintf(&b, "LVB: %s seq %d", spacedHex(r.LVB), r.LVBSeq)
				if r.ValNotValid {
					b.WriteString(" (not valid)")
				}
				b.WriteByte('\n')
			}
			if r.Idle {
				b.WriteString("Idle (cached, no locks)\n")
			}
			for _, q := range []struct {
				name  string
				locks []Lock
			}{{"Granted Queue", r.Granted}, {"Conversion Queue", r.Converting}, {"Waiting Queue", r.Waiting}} {
				b.WriteString(q.name + "\n")
				for _, lk := range q.locks {
					mode := lk.Mode
					if lk.Requested != "" {
						mode += " (" + lk.Requested + ")"
					}
					where := fmt.Sprintf("Remote: %3d", lk.Node)
					if lk.Node == l.Node {
						where = "Local"
					}
					fmt.Fprintf(&b, "%s %-9s %s owner %d", lk.ID, mode, where, lk.Owner)
					if lk.Flags != "" {
						fmt.Fprintf(&b, " flags %s", lk.Flags)
					}
					if lk.Orphan {
						b.WriteString(" orphan")
					}
					b.WriteByte('\n')
				}
			}
		}
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("ctl: writing lock dump: %w", err)
	}
	return nil
}

// printable escapes non-printable bytes of a resource name (names are
// binary-safe in the DLM).
func printable(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c < 0x7f && c != '"' && c != '\\' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "\\x%02x", c)
		}
	}
	return b.String()
}

// spacedHex turns "0a0b0c" into "0a 0b 0c".
func spacedHex(h string) string {
	var b strings.Builder
	for i := 0; i+1 < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}
