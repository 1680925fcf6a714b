package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"
)

// The bash and zsh scripts ask the binary itself for completions
// (urfave/cli's --generate-bash-completion, on with EnableBashCompletion);
// they are urfave/cli's autocomplete scripts with the program named.
const bashCompletion = `# bash completion for meshlink: source it, or put it in
# /etc/bash_completion.d/meshlink (or ~/.local/share/bash-completion/completions/meshlink)
_meshlink_bash_autocomplete() {
  if [[ "${COMP_WORDS[0]}" != "source" ]]; then
    local cur opts words cword
    COMPREPLY=()
    cur="${COMP_WORDS[COMP_CWORD]}"
    words=("${COMP_WORDS[@]:0:$COMP_CWORD}")
    if [[ "$cur" == "-"* ]]; then
      opts=$("${words[@]}" "${cur}" --generate-bash-completion 2>/dev/null)
    else
      opts=$("${words[@]}" --generate-bash-completion 2>/dev/null)
    fi
    COMPREPLY=($(compgen -W "${opts}" -- "${cur}"))
    return 0
  fi
}
complete -o bashdefault -o default -F _meshlink_bash_autocomplete meshlink
`

const zshCompletion = `#compdef meshlink
# zsh completion for meshlink: put it in a directory of $fpath as _meshlink,
# or source it after compinit.
_meshlink() {
  local -a opts
  local cur
  cur=${words[-1]}
  if [[ "$cur" == "-"* ]]; then
    opts=("${(@f)$(${words[@]:0:#words[@]-1} ${cur} --generate-bash-completion 2>/dev/null)}")
  else
    opts=("${(@f)$(${words[@]:0:#words[@]-1} --generate-bash-completion 2>/dev/null)}")
  fi
  if [[ "${opts[1]}" != "" ]]; then
    _describe 'values' opts
  else
    _files
  fi
}
compdef _meshlink meshlink
`

func completionCmd() *cli.Command {
	return &cli.Command{
		Name:      "completion",
		Usage:     "print a shell completion script: source <(meshlink completion bash)",
		ArgsUsage: "bash|zsh|fish",
		Action: func(c *cli.Context) error {
			if err := wantArgs(c, 1, "bash|zsh|fish"); err != nil {
				return err
			}
			switch sh := c.Args().First(); sh {
			case "bash":
				fmt.Print(bashCompletion)
			case "zsh":
				fmt.Print(zshCompletion)
			case "fish":
				s, err := c.App.ToFishCompletion()
				if err != nil {
					return err
				}
				fmt.Print(s)
			default:
				return usageErrorf("%s: unknown shell %q; want %s", commandName(c), sh, strings.Join([]string{"bash", "zsh", "fish"}, ", "))
			}
			return nil
		},
	}
}
