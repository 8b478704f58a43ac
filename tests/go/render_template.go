// render_template renders an Ollama Modelfile TEMPLATE with Go's text/template, the
// engine Ollama uses, and the data shape Ollama passes (template/template.go):
// messages mode {System, Messages[{Role, Content}], Tools, Response} or legacy mode
// {System, Prompt, Response}. Input on stdin: {"template": "...", "data": {...}};
// output on stdout: the rendered text, nothing else.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string `json:"template"`
	Data     struct {
		System   string     `json:"System"`
		Messages []*Message `json:"Messages"`
		Prompt   string     `json:"Prompt"`
		Response string     `json:"Response"`
	} `json:"data"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var in Input
	if err := json.Unmarshal(raw, &in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(1)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(2)
	}
	var vars map[string]any
	if in.Data.Messages != nil {
		vars = map[string]any{"System": in.Data.System, "Messages": in.Data.Messages, "Tools": nil, "Response": ""}
	} else {
		vars = map[string]any{"System": in.Data.System, "Prompt": in.Data.Prompt, "Response": in.Data.Response}
	}
	if err := tmpl.Execute(os.Stdout, vars); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(3)
	}
}
